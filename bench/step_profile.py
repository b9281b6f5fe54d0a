"""Where a training update's time goes: a JAX profile of the fast path, summed by kind of operation.

    .venv/bin/python bench/step_profile.py [--rows 64] [--updates 8] [--max-batch-tokens N] [--out
    FILE]

Sets up the fast path as bench/train_throughput.py's project arm does (the real embedded Gemma 3
270M, LoRA rank 8 on all projections, batches of 4, steps of at most ``--max-batch-tokens`` tokens,
by default the ``cpu`` profile's MAX_BATCH_TOKENS), runs one pass so that every step shape is
compiled, then traces ``--updates`` updates with ``jax.profiler`` and adds up the time of each XLA
operation the CPU ran, by kind: matmuls of the forward and of the backward pass (their FLOPs read
from the compiled HLO's dot shapes), layout copies (copies and transposes), and everything else
(elementwise, reductions, gathers, the optimizer); every matmul shape is also timed alone.
It measures the time during which any matmul ran (overlaps counted once) and, from the machine's
fp32 matmul peak, the bound that puts on the speed benchmark's ``peak_share``: the update's model
FLOPs at the peak plus the rest of the update as measured. Prints Markdown tables; writes JSON
(default ``runs/bench/step_profile.json``).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import files, paths

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import (
    MAX_BATCH_TOKENS,
    head_entries,
    matmul_peak_gflops,
    prepare_rows,
    project_trainer,
    step_flops,
    sustained_gflops,
)

# thunks that run other thunks: their time is counted inside
CONTAINERS = {"conditional", "while", "call"}
# name, shape (tuples too), opcode, rest
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")


def dims(shape: str) -> list[int]:
    """The dimensions of an HLO array shape such as ``f32[4,96,640]`` (``[]`` for a scalar)."""
    inside = shape[shape.index("[") + 1 : shape.index("]")]
    return [int(d) for d in inside.split(",") if d]


def dot_flops(lhs: list[int], out: list[int], lhs_contracting: tuple[int, ...]) -> int:
    """2 × output elements × contracted size of one dot."""
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contracting)


def axis_list(attrs: str, key: str) -> tuple[int, ...]:
    """The axes of an HLO dot attribute such as ``lhs_contracting_dims={1}`` (empty when absent)."""
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def dot_cost(ins: dict, shapes: dict[str, str]) -> tuple[int, bool, str, tuple]:
    """FLOPs of one HLO ``dot``, whether it belongs to the backward pass (JAX names those
    ``transpose(...)``), its shapes as text, and ``(lhs dims, rhs dims, dimension numbers)`` to run
    it alone with ``lax.dot_general``."""
    lhs, rhs = re.match(r"%([^,\s)]+), %([^,\s)]+)", ins["rest"]).groups()
    op_name = re.search(r'op_name="([^"]*)"', ins["rest"])
    axes = {
        k: axis_list(ins["rest"], k)
        for k in (
            "lhs_contracting_dims",
            "rhs_contracting_dims",
            "lhs_batch_dims",
            "rhs_batch_dims",
        )
    }
    numbers = (
        (axes["lhs_contracting_dims"], axes["rhs_contracting_dims"]),
        (axes["lhs_batch_dims"], axes["rhs_batch_dims"]),
    )
    contracted = "·".join(",".join(map(str, a)) for a in numbers[0])
    shape = (
        f"{dims(shapes[lhs])}·{dims(shapes[rhs])} → {dims(ins['shape'])} (contracting {contracted})"
    )
    backward = bool(op_name and "transpose(" in op_name.group(1))
    flops = dot_flops(dims(shapes[lhs]), dims(ins["shape"]), numbers[0][0])
    return flops, backward, shape, (dims(shapes[lhs]), dims(shapes[rhs]), numbers)


def alone_gflops(lhs: list[int], rhs: list[int], numbers: tuple, seconds: float = 0.5) -> float:
    """GFLOP/s of one fp32 ``lax.dot_general`` of these shapes run by itself, jitted, on this
    machine (row-major operands, without the operations XLA fused around it in the step)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, numbers))
    a, b = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
    return sustained_gflops(
        f, (a, b), dot_flops(lhs, list(f.eval_shape(a, b).shape), numbers[0][0]), seconds
    )


def module_name(text: str) -> str:
    """The module name of an HLO text (``HloModule jit_f, ...``), as the trace's events name it."""
    return re.match(r"HloModule (\S+?),", text).group(1)


def hlo_operations(text: str) -> dict[str, dict]:
    """Each operation an optimized HLO module (``compiled.as_text()``) runs (fusion bodies
    excluded): opcode, kind, matmul FLOPs."""
    shapes, instructions, computation = {}, {}, ""
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m.group(1)
        elif m := _INSTRUCTION.match(line):
            name, shape, opcode, rest = m.groups()
            shapes[name] = shape
            instructions[name] = {
                "computation": computation,
                "opcode": opcode,
                "rest": rest,
                "shape": shape,
            }
    dots_in = collections.defaultdict(list)  # computation -> its dots' (FLOPs, backward, shapes)
    for ins in instructions.values():
        if ins["opcode"] == "dot":
            dots_in[ins["computation"]].append(dot_cost(ins, shapes))
    calls = {
        name: re.search(r"calls=%([^,\s]+)", ins["rest"]) for name, ins in instructions.items()
    }
    fused = {
        c.group(1) for name, c in calls.items() if c and instructions[name]["opcode"] == "fusion"
    }
    ops = {}
    for name, ins in instructions.items():
        if ins["computation"] in fused:
            continue  # inside a fusion: runs as part of it, not as an operation of its own
        called = calls[name]
        if ins["opcode"] == "dot":
            dots = [dot_cost(ins, shapes)]
        else:
            dots = dots_in[called.group(1)] if ins["opcode"] == "fusion" and called else []
        if ins["opcode"] in CONTAINERS:
            kind = "container"
        elif dots:
            kind = "matmul, backward" if any(d[1] for d in dots) else "matmul, forward"
        elif ins["opcode"] in ("copy", "transpose") or name.startswith(("copy", "transpose")):
            kind = "layout copies"
        else:
            kind = "other"
        ops[name] = {
            "opcode": ins["opcode"],
            "kind": kind,
            "flops": sum(d[0] for d in dots),
            "dots": " + ".join(d[2] for d in dots),
            "dot_args": [d[3] for d in dots],
        }
    return ops


def traced_operations(trace_dir: str) -> list[tuple[str, str, int, int]]:
    """The XLA operations a ``jax.profiler`` trace recorded on the CPU: (module, operation, start
    ns, end ns)."""
    from jax.profiler import ProfileData

    (path,) = Path(trace_dir).rglob("*.xplane.pb")
    plane = ProfileData.from_file(str(path)).find_plane_with_name("/host:CPU")
    out = []
    for line in plane.lines:
        for event in line.events:
            stats = dict(event.stats)
            if "hlo_op" in stats:
                module, op = str(stats.get("hlo_module", "")), str(stats["hlo_op"])
                out.append((module, op, int(event.start_ns), int(event.end_ns)))
    return out


def kind_of(module: str, op: str, ops: dict[str, dict], step_module: str) -> tuple[str, int]:
    """The kind and FLOPs of one traced operation; those of other modules (the optimizer, the
    gradient sums) count as "optimizer"."""
    if module != step_module:
        return "optimizer and gradient sums", 0
    if op not in ops:
        raise RuntimeError(
            f"the trace names {op!r}, which the compiled step's HLO does not hold (trace and HLO disagree)"
        )
    return ops[op]["kind"], ops[op]["flops"]


def busy_seconds(intervals: list[tuple[int, int]]) -> float:
    """Seconds during which at least one of the ``(start ns, end ns)`` intervals runs (overlaps
    counted once)."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total / 1e9


def by_kind(
    traced: list[tuple[str, str, int, int]], ops: dict[str, dict], step_module: str
) -> dict[str, list[float]]:
    """Seconds (summed over operations, so concurrent ones add up) and FLOPs per kind of
    operation."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for module, op, start, end in traced:
        kind, flops = kind_of(module, op, ops, step_module)
        if kind != "container":
            totals[kind][0] += (end - start) / 1e9
            totals[kind][1] += flops
    return dict(totals)


def profile(n_rows: int, updates: int, max_batch_tokens: int = MAX_BATCH_TOKENS) -> dict:
    """One pass that compiles every step shape, then ``updates`` updates of a second pass run
    untraced and again traced."""
    import jax

    from nbutils import batches, devices

    rows, _ = prepare_rows(n_rows, 1)
    lm, trainer, arrays = project_trainer(rows, max_batch_tokens)
    state, untraced, plan = trainer.state(), [], batches.epoch_batches(arrays, 4, 0, 1)[:updates]
    for b in batches.epoch_batches(arrays, 4, 0, 0):
        _, state = trainer.update([b], state)
    for b in plan:  # the same updates as traced below, for the trace's own cost
        if trainer.will_compile([b]):
            raise RuntimeError(
                f"step shape {trainer.steps([b])[0].shape} was not compiled by the first pass: use more --rows"
            )
        start = time.perf_counter()
        _, state = trainer.update([b], state)
        untraced.append(time.perf_counter() - start)
    operations, walls, model_flops = {}, [], 0.0
    # seconds during which some operation (of that kind) ran
    busy = {"all": 0.0, "matmul": 0.0, "other": 0.0}
    kinds = collections.defaultdict(lambda: [0.0, 0.0])  # kind -> seconds, FLOPs
    dots = collections.defaultdict(lambda: [0.0, 0.0, 0])  # matmul shapes -> seconds, FLOPs, count
    dot_args = {}  # matmul shapes -> what alone_gflops needs, per dot of the operation
    for b in plan:
        pieces = trainer.steps([b])
        if pieces[0].shape not in operations:
            inputs = devices.place_batch(pieces[0].inputs())
            text = trainer.grad_step.lower(state[0], state[1], inputs, 1.0).compile().as_text()
            operations[pieces[0].shape] = (module_name(text), hlo_operations(text))
        module, ops = operations[pieces[0].shape]
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                start = time.perf_counter()
                _, state = trainer.update([b], state)
                walls.append(time.perf_counter() - start)
            labelled = [(t, kind_of(t[0], t[1], ops, module)[0]) for t in traced_operations(tmp)]
        traced = [t for t, kind in labelled if kind != "container"]
        matmuls = [t for t, kind in labelled if kind.startswith("matmul")]
        for kind, (seconds, flops) in by_kind(traced, ops, module).items():
            kinds[kind][0], kinds[kind][1] = kinds[kind][0] + seconds, kinds[kind][1] + flops
        busy["all"] += busy_seconds([t[2:] for t in traced])
        busy["matmul"] += busy_seconds([t[2:] for t in matmuls])
        busy["other"] += busy_seconds(
            [t[2:] for t, kind in labelled if kind != "container" and not kind.startswith("matmul")]
        )
        for _, op, start_ns, end_ns in matmuls:
            d = dots[ops[op]["dots"]]
            d[0], d[1], d[2] = d[0] + (end_ns - start_ns) / 1e9, d[1] + ops[op]["flops"], d[2] + 1
            dot_args[ops[op]["dots"]] = ops[op]["dot_args"]
        model_flops += sum(
            step_flops(lm.backbone, *p.shape[:2], head_entries(p), merged_lora=False)
            for p in pieces
        )
    n, peak = len(walls), matmul_peak_gflops()
    wall, at_peak = sum(walls) / n, model_flops / n / (peak * 1e9)
    top = sorted(dots.items(), key=lambda kv: -kv[1][0])[:10]
    alone = {
        k: alone_gflops(*args[0], seconds=0.3) if len(args) == 1 else None
        for k, args in dot_args.items()
    }
    # every matmul at the rate its shape reaches alone (a fusion of several dots keeps its traced
    # time)
    matmuls_alone_s = (
        sum(f / (alone[k] * 1e9) if alone[k] else s for k, (s, f, _) in dots.items()) / n
    )
    return {
        "updates": n,
        "max_batch_tokens": max_batch_tokens,
        "step_shapes": sorted(operations),
        "matmul_peak_gflops": peak,
        "wall_s_per_update": wall,
        "untraced_wall_s_per_update": sum(untraced) / n,
        "model_gflop_per_update": model_flops / n / 1e9,
        "busy_s_per_update": busy["all"] / n,
        "matmul_busy_s_per_update": busy["matmul"] / n,
        "matmul_only_s_per_update": (busy["all"] - busy["other"]) / n,
        "matmuls_at_once": sum(v[0] for k, v in kinds.items() if k.startswith("matmul"))
        / busy["matmul"],
        "matmul_gflops_while_busy": sum(f for k, (_, f) in kinds.items() if k.startswith("matmul"))
        / busy["matmul"]
        / 1e9,
        "other_alone_s_per_update": (busy["all"] - busy["matmul"]) / n,
        "peak_share": at_peak / wall,
        "peak_share_bound": at_peak / (at_peak + wall - busy["matmul"] / n),
        "matmuls_at_alone_rates_s_per_update": matmuls_alone_s,
        "peak_share_at_alone_rates": at_peak / (matmuls_alone_s + wall - busy["matmul"] / n),
        "kinds": {
            k: {
                "s_per_update": s / n,
                "gflop_per_update": f / n / 1e9,
                "gflops": f / s / 1e9 if f else None,
            }
            for k, (s, f) in sorted(kinds.items())
        },
        "top_matmuls": [
            {
                "shapes": k,
                "s_per_update": s / n,
                "count_per_update": c / n,
                "gflops": f / s / 1e9,
                "alone_gflops": alone[k],
            }
            for k, (s, f, c) in top
        ],
    }


def table(r: dict) -> str:
    """The profile as Markdown: time by kind of operation, the slowest matmul shapes, the bound."""
    op_s = sum(v["s_per_update"] for v in r["kinds"].values())
    lines = [
        "| operations | s per update (summed; concurrent ones add up) | share | GFLOP per update | GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, v in r["kinds"].items():
        rate = f"{v['gflops']:.0f}" if v["gflops"] else "—"
        share = v["s_per_update"] / op_s
        lines.append(
            f"| {kind} | {v['s_per_update']:.3f} | {share:.0%} | {v['gflop_per_update']:.1f} | {rate} |"
        )
    lines += [
        "",
        "| matmul operation (lhs · rhs → out) | per update | s per update | GFLOP/s | GFLOP/s alone |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in r["top_matmuls"]:
        alone = f"{d['alone_gflops']:.0f}" if d["alone_gflops"] else "—"
        lines.append(
            f"| {d['shapes']} | {d['count_per_update']:g} | {d['s_per_update']:.3f} | {d['gflops']:.0f} | {alone} |"
        )
    shapes = ", ".join(str(tuple(s)) for s in r["step_shapes"])
    both = r["matmul_busy_s_per_update"] - r["matmul_only_s_per_update"]
    summary = (
        f"{r['updates']} traced updates (step shapes {shapes}): {r['wall_s_per_update']:.3f} s per update "
        f"({r['untraced_wall_s_per_update']:.3f} s untraced); XLA operations ran during {r['busy_s_per_update']:.3f} s "
        f"of it, a matmul during {r['matmul_busy_s_per_update']:.3f} s ({r['matmul_only_s_per_update']:.3f} s with no other "
        f"kind of operation, {both:.3f} s beside other operations; {r['matmuls_at_once']:.2f} matmuls at once on "
        f"average, sharing the cores, so the per-operation rates above are lower than alone), the matmuls advancing at "
        f"{r['matmul_gflops_while_busy']:.0f} GFLOP/s together; only other operations ran during "
        f"{r['other_alone_s_per_update']:.3f} s. {r['model_gflop_per_update']:.0f} model GFLOP "
        f"per update = **{r['peak_share']:.0%}** of the {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak. Were every "
        f"matmul at that peak and the rest of the update as measured, the share would be **{r['peak_share_bound']:.0%}**; "
        f"with every matmul at the rate its shape reaches alone ({r['matmuls_at_alone_rates_s_per_update']:.3f} s "
        f"per update instead of {r['matmul_busy_s_per_update']:.3f}), **{r['peak_share_at_alone_rates']:.0%}**."
    )
    return "\n".join([*lines, "", summary])


def main() -> int:
    """Profile, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="training rows (batches of 4)")
    parser.add_argument(
        "--updates", type=int, default=8, help="updates to trace (from a second pass)"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=MAX_BATCH_TOKENS,
        help="tokens per step (0: whole batches)",
    )
    parser.add_argument("--out", default=str(paths.RUNS_DIR / "bench" / "step_profile.json"))
    args = parser.parse_args()
    result = profile(args.rows, args.updates, args.max_batch_tokens)
    print(table(result))
    files.write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
