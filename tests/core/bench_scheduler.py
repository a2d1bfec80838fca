"""Host-side scheduler cost per step (not collected by pytest).

Run: python -m tests.core.bench_scheduler
Drives Scheduler.schedule() + update_from_output() with a fake model (every sampling request gets
token 5) until all requests finish, and prints the mean milliseconds per step of each call.
"""

from __future__ import annotations

import time

from tests.core.helpers import fake_output, make_request, make_scheduler


def run(num_requests: int, prompt_len: int, max_tokens: int, caching: bool, shared_prompt: bool):
    sched = make_scheduler(num_blocks=num_requests * (prompt_len + max_tokens) // 16 + 8, block_size=16,
                           max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096,
                           enable_prefix_caching=caching)
    for i in range(num_requests):
        prompt = list(range(prompt_len)) if shared_prompt else [i] * prompt_len
        sched.add_request(make_request(f"r{i}", prompt, max_tokens=max_tokens))
    t_sched = t_update = 0.0
    steps = 0
    while sched.has_unfinished_requests():
        t0 = time.perf_counter()
        out = sched.schedule()
        t_sched += time.perf_counter() - t0
        model_output = fake_output(out, token=5)
        t1 = time.perf_counter()
        sched.update_from_output(out, model_output)
        t_update += time.perf_counter() - t1
        steps += 1
    return steps, 1e3 * t_sched / steps, 1e3 * t_update / steps, sched.stats()


def main() -> None:
    for args in [(256, 512, 128, True, False), (256, 512, 128, True, True), (256, 512, 128, False, False)]:
        steps, ms_sched, ms_update, stats = run(*args)
        print(f"requests={args[0]} prompt={args[1]} max_tokens={args[2]} prefix_caching={args[3]} "
              f"shared_prompt={args[4]}: {steps} steps, schedule {ms_sched:.2f} ms/step, "
              f"update {ms_update:.2f} ms/step, prefix hits {stats['prefix_cache_hits']} tokens")


if __name__ == "__main__":
    main()
