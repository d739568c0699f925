"""The benchmark command prints one JSON line with the machine and its figures."""

from __future__ import annotations

import json

from nanochat import bench


def test_bench_train_prints_figures(capsys):
    (result,) = bench.main(["train", "--depth=1", "--vocab-size=512", "--seq-len=32", "--batch-size=2",
                            "--steps=2", "--warmup=1", "--device-type=cpu"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    for key in ("cpu", "cores", "torch", "tok_per_sec", "flops_per_sec", "matmul_peak_flops", "peak_rss_mib"):
        assert key in printed, key
    assert printed["tok_per_sec"] > 0 and 0 < printed["ratio_to_matmul_peak"] < 5
    assert printed["params"] == 2 * 512 * 64 + 12 * 64 * 64
