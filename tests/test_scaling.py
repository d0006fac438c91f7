"""Data-parallel measure: several processes give exactly the one-process result; the GPU path; the
sign handling of the scaling fit."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_model, make_tokenizer, word_text

from calibrated_sampling.cli import main
from calibrated_sampling.data import Window
from calibrated_sampling.measure import measure
from calibrated_sampling.models import load_model
from calibrated_sampling.theory import fit_entce_scaling, fit_scaling

SAMPLERS = ["base", "temperature=0.8", "top_k=5"]


def windows(n: int, steps: int = 7) -> list[Window]:
    rng = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 99, (4 + i % 3 + steps,), generator=rng).tolist()
        out.append(Window(tuple(ids[:-steps]), tuple(ids[-steps:]), f"doc{i}", "test"))
    return out


def comparable(results: dict) -> str:
    """Everything but the timings, as text (exact floats; NaN equals NaN)."""
    return json.dumps({spec: {k: v for k, v in r.items() if k != "seconds"} for spec, r in results.items()},
                      sort_keys=True)


def _worker(rank: int, world: int, folder: str) -> None:
    """One process of the group: process 0 first measures alone (before the group exists) for reference."""
    torch.set_num_threads(1)
    model, tok = load_model(os.path.join(folder, "model"), device="cpu")
    runs = {"uneven": dict(windows=windows(5), batch_size=2),  # 3 batches: process 0 gets two, process 1 one
            "idle": dict(windows=windows(2), batch_size=4)}  # 1 batch: process 1 has nothing to do
    out = {}
    if rank == 0:
        out["single"] = {name: comparable(measure(model, tok, samplers=SAMPLERS, seed=5, progress=False, **run))
                         for name, run in runs.items()}
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        out["multi"] = {name: comparable(measure(model, tok, samplers=SAMPLERS, seed=5, progress=False, **run))
                        for name, run in runs.items()}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(out, handle)


def test_two_processes_equal_one(tmp_path):
    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    for name in ("uneven", "idle"):
        assert rank0["multi"][name] == rank0["single"][name], name  # gathered == one process, exactly
        assert rank1["multi"][name] == rank0["single"][name], name  # and every process holds it
    single = json.loads(rank0["single"]["uneven"])
    assert len(single["base"]["samples"]) == 5 and len(single["base"]["per_step"]["gen_entropy"]) == 7
    assert math.isfinite(single["base"]["log_loss"]) and math.isinf(single["top_k=5"]["log_loss"])


def test_torchrun_cli_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m calibrated_sampling.cli measure` writes what a plain run writes."""
    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(word_text(rng, 40) for _ in range(8)))
    args = ["measure", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--split", "all",
            "--num-prompts", "5", "--prompt-tokens", "8", "--max-new-tokens", "6", "--batch-size", "2",
            "--samplers", "base,temperature=0.8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "calibrated_sampling.cli", *args,
                               "--out", str(tmp_path / "multi")],
                              env=env, capture_output=True, text=True, timeout=180)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("wrote ") == 1  # only process 0 prints and writes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes ran on one thread each: same arithmetic here
    try:
        assert main([*args, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    multi = json.loads((tmp_path / "multi" / "results.json").read_text())["samplers"]
    single = json.loads((tmp_path / "single" / "results.json").read_text())["samplers"]
    assert comparable(multi) == comparable(single)
    assert (tmp_path / "multi" / "samples.jsonl").read_text() == (tmp_path / "single" / "samples.jsonl").read_text()


def test_fit_entce_scaling_signs():
    params = [1e8, 1e9, 1e10]
    positive = [0.4, 0.4 * 10**-0.1, 0.4 * 10**-0.2]
    fit = fit_entce_scaling(params, positive)
    assert fit["fitted"] == "EntCE" and fit["beta"] == pytest.approx(fit_scaling(params, positive)["beta"])
    negative = fit_entce_scaling(params, [-v for v in positive])
    assert negative["fitted"] == "|EntCE|" and negative["beta"] == pytest.approx(-0.1)
    assert "|EntCE|" in negative["note"] and negative["entce_fitted"] == pytest.approx(positive)
    with pytest.raises(ValueError, match="both signs"):
        fit_entce_scaling(params, [0.1, -0.1, 0.2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_measure_and_device_map_auto_on_cuda(tmp_path):
    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    model, tok = load_model(str(tmp_path / "model"), dtype="bfloat16", device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    results = measure(model, tok, windows(4), ["base", "temperature=0.8"], batch_size=2, progress=False)
    for r in results.values():
        assert all(math.isfinite(r[k]) for k in ("log_loss", "gen_entropy", "entce", "human_entropy"))
    auto, tok = load_model(str(tmp_path / "model"), dtype="bfloat16", device_map="auto")
    assert auto.device.type == "cuda" and hasattr(auto, "hf_device_map")
    r = measure(auto, tok, windows(4), ["base"], batch_size=2, progress=False)["base"]
    assert math.isfinite(r["log_loss"]) and math.isfinite(r["gen_entropy"])
