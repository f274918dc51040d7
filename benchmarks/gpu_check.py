"""The GPU check (the Python part of benchmarks/gpu_check.sh): on one CUDA machine, in minutes,

1. the selective scan through `storm_vlm.model.ssm.selective_scan`'s dispatch (mamba-ssm's
   `selective_scan_fn` when installed) against `selective_scan_reference` computed in float64:
   outputs, last states and gradients, forward and reverse, fp32 and bf16 inputs;
2. one bf16 training step of a small STORM model (autocast, backward, AdamW): finite loss and
   gradients, the weights move;
3. with two or more GPUs: a 2-process NCCL step (torchrun, DistributedDataParallel): each rank's
   gradients equal after the all-reduce;
4. `storm_vlm.perf.profiler` on the real widths (SigLIP-so400m-448 + 2-layer BiMamba projector +
   Qwen2-7B, random weights, bf16) at 32 / 128 / 256 frames, no compression / 4x / 8x;

and writes everything into one JSON, rewritten after each step (and each frame count of the
profile), so a run cut short by its time limit keeps what it measured and names the step it was in.
A failure is recorded, not fatal; the NCCL step has its own time limit, and the profile starts no
frame count after `--budget-s` has run out.

    python benchmarks/gpu_check.py --output runs/gpu_check/gpu_check.json
    python benchmarks/gpu_check.py --dry-run --output /tmp/gpu_check.json   # the same steps on CPU, tiny

`--dry-run` runs every step on CPU at tiny sizes (no NCCL), to check the harness anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from storm_vlm.commands import positive_int  # noqa: E402
from storm_vlm.model.configuration import StormConfig  # noqa: E402
from storm_vlm.model.modeling import StormForConditionalGeneration  # noqa: E402
from storm_vlm.model.ssm import scan as scan_module  # noqa: E402
from storm_vlm.model.ssm import selective_scan, selective_scan_reference  # noqa: E402
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, real_config  # noqa: E402
from storm_vlm.perf.host import describe_host, load_average  # noqa: E402
from storm_vlm.perf.profiler import ProfileSettings, profile_model  # noqa: E402
from storm_vlm.perf.report import format_table  # noqa: E402
from storm_vlm.utils import atomic_write_json  # noqa: E402

SMALL = dict(  # a small STORM for the training steps (fits any GPU)
    vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, image_size=64, patch_size=16, vision_use_head=False),
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    projector_num_layers=1, video_token_id=127, image_token_id=126,
)


def _step(name: str, results: dict, save, fn, *args):
    """Run one check; record its result, its time, or its error (the next checks still run). The JSON
    is saved as the step starts (marked running) and as it ends."""
    t = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    results[name] = {"ok": None, "running": True}
    save()
    try:
        results[name] = {"ok": True, **fn(*args)}
    except Exception as exc:  # noqa: BLE001 - a failed check is a result
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - t, 1)
    save()
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED: ' + results[name]['error']} "
          f"({results[name]['seconds']} s)", flush=True)


# ---- 1. the scan ---------------------------------------------------------------------------------------


def _scan_inputs(device, dtype, b=2, d=256, n=16, length=1024, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u, z = r(b, d, length).to(dtype), r(b, d, length).to(dtype)
    delta = (r(b, d, length, scale=0.5)).to(dtype)
    A = -torch.exp(r(d, n, scale=0.5))  # fp32, as the mixer passes it
    B, C = r(b, n, length).to(dtype), r(b, n, length).to(dtype)
    D, delta_bias = r(d), r(d, scale=0.1)
    return [u, delta, A, B, C, D, z, delta_bias]


@contextlib.contextmanager
def _mamba_ssm_calls():
    """A list that grows by one for each scan that reaches mamba-ssm's kernel while inside."""
    calls: list[int] = []
    fn = scan_module._mamba_ssm_fn()
    if fn is None:
        yield calls
        return

    def counted(*args):
        calls.append(1)
        return fn(*args)

    saved = scan_module._mamba_ssm_fn
    scan_module._mamba_ssm_fn = lambda: counted
    try:
        yield calls
    finally:
        scan_module._mamba_ssm_fn = saved


def check_scan(device: str) -> dict:
    """Each case scans twice through the dispatch: with autograd for the output and its gradients,
    and without for the last state (mamba-ssm's kernel drops a last state's gradient, so a scan that
    records one runs the PyTorch path). Where mamba-ssm is importable, both must reach its kernel."""
    kernel = device == scan_module._MAMBA_SSM_DEVICE and scan_module._mamba_ssm_fn() is not None
    out = {"mamba_ssm": kernel, "cases": []}
    if device == "cuda" and not kernel:
        out["note"] = ("mamba-ssm is not usable (not installed, not importable, or built without its kernel: see "
                       "mamba_ssm_version and any warning): selective_scan ran its pure-PyTorch path on CUDA")
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        for reverse in (False, True):
            inputs = _scan_inputs(device, dtype, length=256 if device == "cpu" else 1024)
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            with _mamba_ssm_calls() as calls:
                y = selective_scan(*leaves, delta_softplus=True, reverse=reverse)
                with torch.no_grad():
                    _, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True, reverse=reverse)
            ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
            flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
            u, delta, A, B, C, D, z, bias = ref_leaves
            y_ref, last_ref = selective_scan_reference(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), bias,
                                                       delta_softplus=True, return_last_state=True)
            y_ref = flip(y_ref)
            gy = torch.randn_like(y_ref)
            (y.double() * gy).sum().backward()
            (y_ref * gy).sum().backward()
            scale = y_ref.abs().max().item()
            case = {"dtype": str(dtype).replace("torch.", ""), "reverse": reverse, "mamba_ssm_calls": len(calls),
                    "out_max_rel_err": (y.double() - y_ref).abs().max().item() / scale,
                    "last_state_max_rel_err": (last.double() - last_ref).abs().max().item()
                    / last_ref.abs().max().item()}
            grads = {}
            for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), leaves, ref_leaves):
                grads[name] = (a.grad.double() - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-30)
            case["grad_max_rel_err"] = grads
            case["ok"] = (max(case["out_max_rel_err"], case["last_state_max_rel_err"], *grads.values()) < tol
                          and len(calls) == (2 if kernel else 0))
            out["cases"].append(case)
    if not all(c["ok"] for c in out["cases"]):
        raise AssertionError(f"scan differs from the reference or missed mamba-ssm's kernel: {out['cases']}")
    return out


# ---- 2. a bf16 training step -------------------------------------------------------------------------


def _batch(model, device, frames=4, text=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vis = cfg.num_visual_tokens(frames)
    ids = torch.randint(0, cfg.image_token_id - 1, (1, text), generator=g)
    ids = torch.cat([ids[:, :2], torch.full((1, vis), cfg.video_token_id), ids[:, 2:]], dim=1)
    vc = cfg.vision_config
    pixels = torch.randn(1, frames, 3, vc.image_size, vc.image_size, generator=g)
    return ids.to(device), pixels.to(device), ids.clone().to(device)


def train_step(device: str) -> dict:
    torch.manual_seed(0)
    model = StormForConditionalGeneration(StormConfig(**SMALL)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, pixels, labels = _batch(model, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, pixel_values_videos=pixels, labels=labels).loss
    loss.backward()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    moved = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    if not (torch.isfinite(loss) and finite and moved):
        raise AssertionError(f"loss {loss.item()}, finite grads {finite}, parameters moved {moved}")
    return {"loss": loss.item(), "parameters_moved": moved, "autocast": "bfloat16"}


# ---- 3. two-process NCCL --------------------------------------------------------------------------------


def ddp_worker() -> None:
    """Run by torchrun: one DDP step on each rank; rank 0 writes the gradient comparison."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)  # before the process group, whose NCCL communicators use the current device
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = StormForConditionalGeneration(StormConfig(**SMALL)).cuda().train()
    # the vision layers after vision_feature_layer and the image path get no gradient
    ddp = DistributedDataParallel(model, device_ids=[local_rank], find_unused_parameters=True)
    ids, pixels, labels = _batch(model, "cuda", seed=rank)  # different data per rank
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ddp(input_ids=ids, pixel_values_videos=pixels, labels=labels).loss
    loss.backward()
    flat = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if rank == 0:
        diff = max((g - gathered[0]).abs().max().item() for g in gathered)
        Path(os.environ["GPU_CHECK_DDP_OUT"]).write_text(json.dumps(
            {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "max_grad_diff_between_ranks": diff,
             "loss_rank0": loss.item()}))
    dist.destroy_process_group()


def run_torchrun(cmd: list[str], env: dict, timeout_s: float, grace_s: float = 40.0) -> tuple[int, str]:
    """(exit status, stderr) of the torchrun command `cmd`. Past `timeout_s` it gets SIGTERM, on which
    torchrun stops its workers (each runs in a session of its own, so neither subprocess.run's
    timeout nor killing torchrun's process group would reach them, and a hung NCCL step would keep
    the GPUs the next check needs); after `grace_s` more its group gets SIGKILL. Then TimeoutExpired
    is raised. stderr goes through a file: workers that outlive torchrun keep its pipes open."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        err.seek(0)
        return proc.returncode, err.read()


def nccl_step(timeout_s: float) -> dict:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_ddp_{os.getpid()}.json"
    env = {**os.environ, "GPU_CHECK_DDP_OUT": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--ddp-worker"]
    code, err = run_torchrun(cmd, env, timeout_s)
    if code != 0:
        raise RuntimeError(f"torchrun exited {code}: {err[-2000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    if res["max_grad_diff_between_ranks"] != 0.0:
        raise AssertionError(f"ranks disagree after all-reduce: {res}")
    return res


# ---- 4. the profiler at real widths ----------------------------------------------------------------------


def real_model(device: str, llm_layers: int | None):
    """Random-weight STORM at the paper's widths (bf16 on CUDA), built on the device."""
    overrides = {}
    if llm_layers:
        overrides["text_config"] = {"num_hidden_layers": llm_layers}
    config = real_config(**overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = StormForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def _auto_llm_layers(device: str) -> int | None:
    """All 28 Qwen2-7B layers where the GPU holds the fp32 build (~33 GB) and its bf16 copy; fewer
    layers (same widths) on smaller GPUs."""
    if device != "cuda":
        return None
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total >= 64:
        return None
    per_layer_gb = 233e6 * 6 / 2**30  # ~233 M parameters per Qwen2-7B layer, fp32 build + bf16 copy
    return max(2, int((total * 0.6 - 8) / per_layer_gb))


def _profile_in_time(model, settings: ProfileSettings, source: str, deadline: float, partial) -> dict:
    """`profile_model` one frame count at a time while `deadline` (time.monotonic) has not passed, the
    rows of all in one result (in profile_model's order); `partial(result)` after each frame count
    saves what is measured so far. Frame counts left out for time are listed in `frames_skipped`."""
    result, done, skipped = None, [], []
    for frames in settings.frames:
        if time.monotonic() >= deadline:
            skipped.append(frames)
            continue
        part = profile_model(model, dataclasses.replace(settings, frames=[frames]), source=source, progress=False)
        done.append(frames)
        if result is None:
            result = part
        else:
            result["rows"] = sorted(result["rows"] + part["rows"], key=lambda r: (r["compression"], r["frames"]))
        result["settings"]["frames"] = done
        partial(result)
    if result is None:
        raise TimeoutError(f"no time left to profile any of the frame counts {settings.frames}")
    result["frames_skipped"] = skipped
    print(format_table(result), flush=True)
    return result


def profile_real(device: str, frames: list[int], llm_layers: int | None, deadline: float, partial) -> dict:
    model = real_model(device, llm_layers)
    settings = ProfileSettings(frames=frames, compressions=list(DEFAULT_COMPRESSIONS.values()), repeats=2,
                               warmup=1, decode_tokens=16, text_tokens=64, precision="bfloat16", device=device)
    source = f"random weights, real widths{f', {llm_layers} LLM layers' if llm_layers else ''}"
    return {"llm_layers": llm_layers or 28, "profile": _profile_in_time(model, settings, source, deadline, partial)}


def dry_profile(frames: list[int], deadline: float, partial) -> dict:
    from helpers import TINY_CONFIG

    torch.manual_seed(0)
    model = StormForConditionalGeneration(StormConfig(**TINY_CONFIG)).eval()
    settings = ProfileSettings(frames=frames, compressions=list(DEFAULT_COMPRESSIONS.values()), repeats=1, warmup=0,
                               decode_tokens=2, text_tokens=4, precision="float32", device="cpu")
    result = _profile_in_time(model, settings, "dry run: tiny random model on CPU", deadline, partial)
    return {"llm_layers": model.config.text_config.num_hidden_layers, "profile": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/gpu_check/gpu_check.json")
    p.add_argument("--frames", default="32,128,256")
    p.add_argument("--llm-layers", type=positive_int, default=None,
                   help="Qwen2-7B layers to build (default: all 28 where the GPU has >= 64 GiB, fewer below)")
    p.add_argument("--budget-s", type=float, default=540, help="time left for these checks (the NCCL step's limit)")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny sizes (no NCCL)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker()
        return 0
    start = time.perf_counter()
    deadline = time.monotonic() + args.budget_s - 30  # the profile starts no frame count after this
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run to check the harness",
              file=sys.stderr)
        return 2
    results: dict = {"dry_run": args.dry_run, "host": describe_host(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        results["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(args.output, results, indent=2)

    if device == "cuda":
        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        results["cuda"] = torch.version.cuda
    try:
        import mamba_ssm

        results["mamba_ssm_version"] = mamba_ssm.__version__
    except Exception as exc:  # noqa: BLE001
        results["mamba_ssm_version"] = f"not importable ({type(exc).__name__}: {exc})"
    _step("scan_vs_reference", results, save, check_scan, device)
    _step("bf16_train_step", results, save, train_step, device)
    if device == "cuda" and torch.cuda.device_count() >= 2:
        _step("nccl_2_process_step", results, save, nccl_step, max(60.0, args.budget_s / 4))
    else:
        results["nccl_2_process_step"] = {"ok": None, "skipped": "fewer than 2 GPUs" if device == "cuda" else "dry run"}

    def partial(profile: dict):
        results["profile"] = {"ok": None, "running": True, "profile": profile}
        save()

    frames = [int(x) for x in args.frames.split(",")]
    if args.dry_run:
        _step("profile", results, save, dry_profile, [2, 4], deadline, partial)
    else:
        layers = args.llm_layers or _auto_llm_layers(device)
        _step("profile", results, save, profile_real, device, frames, layers, deadline, partial)
    results["load_average_end"] = load_average()
    save()
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"[gpu_check] wrote {args.output} ({results['seconds']} s); "
          + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
