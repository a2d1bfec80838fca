"""gRPC service over the fake engine: streaming, status codes, cancel/deadline, health, reflection, drain."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxllm._proto import jaxllm_pb2 as pb
from jaxllm.client import JaxLLMClient
from jaxllm.entrypoints.serve import ServeOptions, ServerThread
from tests.entrypoints.serving_fakes import FakeEngine, expected_tokens


@pytest.fixture(scope="module")
def server():
    st = ServerThread(FakeEngine(step_delay=0.002, max_num_seqs=64, num_kv_blocks=4096),
                      ServeOptions(grpc_port=0, http_port=None)).start()
    yield st
    assert st.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with JaxLLMClient(server.grpc_target, timeout=30) as c:
        yield c


def wait_all_blocks_free(client, timeout=10.0) -> pb.ServerInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = client.server_info()
        if info.kv_blocks_used == 0 and info.num_open_streams == 0 and info.num_requests_running == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not freed: {info}")
        time.sleep(0.02)


def test_generate_streams_the_model_output(client):
    chunks = list(client.generate_stream([5, 6, 7], max_tokens=6, temperature=0.0, logprobs=2))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected_tokens([5, 6, 7], 6)
    assert [c.completion_tokens for c in chunks] == list(range(1, 7))
    assert all(c.prompt_tokens == 3 for c in chunks)
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_UNSPECIFIED] * 5 + [pb.FINISH_REASON_LENGTH]
    assert all(len(c.logprobs) == len(c.token_ids) and len(c.logprobs[0].top) == 3 for c in chunks)
    assert [c.logprobs[0].sampled.token_id for c in chunks] == tokens


def test_text_prompt_tokenize_and_infos(client, server):
    ids = client.tokenize("w1 w2 w3")
    assert ids == server.engine.tokenizer.encode("w1 w2 w3")
    out = client.generate("w1 w2 w3", max_tokens=3, stop_token_ids=[expected_tokens(ids, 3)[1]])
    assert out.token_ids == expected_tokens(ids, 2) and out.finish_reason == "stop"
    assert out.text == server.engine.tokenizer.decode(out.token_ids)
    info = client.model_info()
    assert (info.model, info.max_model_len, info.vocab_size) == ("fake-model", 64, len(server.engine.tokenizer))
    si = client.server_info()
    assert si.kv_blocks_total == 4096 and si.uptime_s > 0


@pytest.mark.parametrize("kw, field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                       ({"logprobs": 99}, "logprobs"), ({"max_tokens": 100}, "max_tokens")])
def test_invalid_argument_names_the_field(client, kw, field):
    prompt = [3] if field != "max_tokens" else [3] * 10  # 10 + 100 > max_model_len 64
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(prompt, **kw)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (field if field != "max_tokens" else "prompt") in ei.value.details()


def test_missing_input_is_invalid(client):
    with pytest.raises(grpc.RpcError) as ei:
        list(client.stub.Generate(pb.GenerateRequest()))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in ei.value.details()


def test_cancel_mid_stream_aborts_and_frees_blocks(client, server):
    it = client.generate_stream([4, 5], max_tokens=50, request_id="to-cancel")
    first = next(it)
    assert first.token_ids
    it.close()  # cancels the call
    wait_all_blocks_free(client)
    assert "to-cancel" in server.engine.aborted


def test_deadline_aborts_and_frees_blocks(client, server):
    with pytest.raises(grpc.RpcError) as ei:
        list(client.generate_stream([6, 7], max_tokens=60, request_id="deadline", timeout=0.05))
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_blocks_free(client)
    assert "deadline" in server.engine.aborted


def test_abort_rpc_ends_stream_with_abort(client):
    it = client.generate_stream([8], max_tokens=60, request_id="abort-me")
    next(it)
    client.abort("abort-me")
    rest = list(it)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT


def test_many_concurrent_streaming_clients(client):
    n, results, errors = 200, {}, []

    def worker(i):
        try:
            prompt = [3 + i % 11, 4 + i % 13]
            toks = [t for c in client.generate_stream(prompt, max_tokens=4 + i % 3) for t in c.token_ids]
            results[i] = toks == expected_tokens(prompt, 4 + i % 3)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == n and all(results.values())
    assert time.monotonic() - t0 < 60
    wait_all_blocks_free(client)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "jaxllm.v1.JaxLLM"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"jaxllm.v1.JaxLLM", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted():
    engine = FakeEngine()
    engine.gate.clear()
    st = ServerThread(engine, ServeOptions(grpc_port=0, http_port=None, max_queued_requests=1,
                                           shutdown_timeout=0.5)).start()
    try:
        with JaxLLMClient(st.grpc_target, timeout=10) as c:
            first = c.generate_stream([3], max_tokens=2)
            holder = threading.Thread(target=lambda: list(first))
            holder.start()
            deadline = time.monotonic() + 5
            while c.server_info().num_open_streams < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as ei:
                c.generate([4], max_tokens=2)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queued_requests=1" in ei.value.details()
            engine.gate.set()
            holder.join(10)
            assert c.generate([4], max_tokens=2).token_ids == expected_tokens([4], 2)
    finally:
        engine.gate.set()
        assert st.stop() == 0


def test_api_key_required():
    st = ServerThread(FakeEngine(), ServeOptions(grpc_port=0, http_port=None, api_key="s3cret")).start()
    try:
        with JaxLLMClient(st.grpc_target, timeout=10) as anon:
            for call in (lambda: anon.generate([3], max_tokens=2), anon.model_info):
                with pytest.raises(grpc.RpcError) as ei:
                    call()
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert anon.health() == "SERVING"  # health stays open for probes
        with JaxLLMClient(st.grpc_target, api_key="wrong", timeout=10) as bad:
            with pytest.raises(grpc.RpcError) as ei:
                bad.model_info()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with JaxLLMClient(st.grpc_target, api_key="s3cret", timeout=10) as good:
            assert good.generate([3], max_tokens=2).token_ids == expected_tokens([3], 2)
    finally:
        assert st.stop() == 0


def test_engine_failure_ends_streams_unavailable_and_not_serving():
    engine = FakeEngine(step_delay=0.005)
    st = ServerThread(engine, ServeOptions(grpc_port=0, http_port=None, shutdown_timeout=0.5))
    # Keep the stop from tearing the gRPC server down before we look: watch health from a client.
    st.start()
    with JaxLLMClient(st.grpc_target, timeout=10) as c:
        it = c.generate_stream([3], max_tokens=60)
        next(it)
        engine.fail_at_step = engine.num_steps + 1
        with pytest.raises(grpc.RpcError) as ei:
            list(it)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "injected failure" in ei.value.details()
    assert st.wait(20) == 1  # the serving process exits non-zero


def test_drain_finishes_short_requests_and_aborts_long_ones():
    engine = FakeEngine(step_delay=0.01)
    st = ServerThread(engine, ServeOptions(grpc_port=0, http_port=None, shutdown_timeout=0.4)).start()
    with JaxLLMClient(st.grpc_target, timeout=20) as c:
        short = c.generate_stream([3], max_tokens=5)
        long = c.generate_stream([4], max_tokens=60)
        next(short), next(long)
        st.request_stop()
        time.sleep(0.05)
        assert c.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as ei:
            c.generate([5], max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(short)[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert list(long)[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert st.wait(20) == 0


def test_committed_stubs_match_the_proto():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.check() == [], "run python tools/gen_protos.py and commit jaxllm/_proto"


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), cert_pem


def test_tls(tmp_path):
    certfile, keyfile, cert_pem = _self_signed(tmp_path)
    st = ServerThread(FakeEngine(), ServeOptions(grpc_port=0, http_port=None, ssl_certfile=certfile,
                                                 ssl_keyfile=keyfile)).start()
    try:
        with JaxLLMClient(st.grpc_target, root_certificates=cert_pem, timeout=10) as c:
            assert c.generate([3, 4], max_tokens=3).token_ids == expected_tokens([3, 4], 3)
        with JaxLLMClient(st.grpc_target, timeout=5) as plain:  # plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError):
                plain.model_info()
    finally:
        assert st.stop() == 0


def test_cli_generate_via_server(server, capsys):
    from jaxllm.entrypoints.cli import main

    tok = server.engine.tokenizer
    assert main(["generate", "--server", server.grpc_target, "w1 w2", "w3", "--max-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [tok.decode(expected_tokens(tok.encode(p), 3)) for p in ("w1 w2", "w3")]
    assert main(["generate", "--server", server.grpc_target, "w1", "--max-tokens", "3", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(expected_tokens(tok.encode("w1"), 3))
    # A server-side refusal is an error exit, not a traceback.
    assert main(["generate", "--server", server.grpc_target, "w1", "--max-tokens", "500"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
