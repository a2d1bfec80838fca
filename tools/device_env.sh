# Sourced by the tools/run_*.sh device scripts: installs the carried wheels (jax-triton and the HTTP
# server's; `.whl/` beside the repository root, or `../.whl` when running inside `.snap/`) into
# /tmp/site and sets the environment every run uses. Expects the current directory = repo root.
OUT=${OUT:-./bench_out}; mkdir -p "$OUT"
WHL=${WHL:-.whl}; [[ -d $WHL ]] || WHL=../.whl
if ls $WHL/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $WHL/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import jax_triton" 2>/dev/null || echo "### WARNING: jax_triton not importable: the triton backend is missing"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}" TF_CPP_MIN_LOG_LEVEL=2 JAXLLM_CACHE_DIR=${JAXLLM_CACHE_DIR:-/tmp/jaxllm_cache}
