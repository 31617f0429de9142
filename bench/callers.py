"""Issue 12's unary and Open Inference Protocol scenarios: concurrent Predict callers merged on the batch axis
(against the same server with merging off, and the model in-process), and OIP sequences driven by the
unmodified `tritonclient` asyncio client (against the native API at the same number of sequences)."""

import collections

from bench.harness import Bench, median_of
from bench.inproc import InProcessModel
from bench.plan import MODELS
from bench.tables import _ms, _n, _ratio, _table

MERGED, UNMERGED = "merged", "unmerged (max_predict_batch 1)"
ONE_CALLER = "one caller"
# (config, load kind): each OIP path beside the native path it is held against
OIP_PAIRS = ((("OIP ModelStreamInfer", "oip_stream"), ("native Stream", "closed")),
             (("OIP ModelInfer", "oip_infer"), ("native Step", "step_callers")))


def merged(bench: Bench) -> None:
    """`merged_callers` concurrent Predict callers of `[seq_len, batch]`, on a server that merges and on one
    that does not, then one caller, then the model in-process at one caller's shape."""
    name, (seq_len, batch), callers = bench.plan.merged_model, bench.plan.merged_shape, bench.plan.merged_callers
    job = dict(seq_len=seq_len, batch=batch, input_size=MODELS[name][0])
    runs = collections.defaultdict(list)
    with bench.server(name) as on, bench.server(name, "-unmerged", max_predict_batch=1) as off:
        for repeat in range(bench.plan.repeats):
            for config, child, count in ((UNMERGED, off, callers), (MERGED, on, callers), (ONE_CALLER, on, 1)):
                before = on.metric("lstmserve_predict_merged_total")
                figures = bench.measure("predict_callers", child.address, 1, clients=1, callers=count, **job)
                figures["merged_requests"] = on.metric("lstmserve_predict_merged_total") - before
                runs[config].append(figures)
                bench.progress(f"merged {name} [{seq_len}, {batch}] x{count} {repeat + 1}/{bench.plan.repeats} "
                               f"{config:12s} {figures['throughput']:9.0f} steps/s p99 {figures['p99'] * 1e3:.2f} ms")
    model = InProcessModel(bench.model_path(name), bench.plan.torch_threads, bench.plan.device)
    configs = {config: median_of(r) for config, r in runs.items()}
    configs["in-process"] = {"throughput": model.steps_per_second(seq_len, batch)}
    bench.results["merged"].append({"model": name, "seq_len": seq_len, "batch": batch, "callers": callers,
                                    "configs": configs})


def oip(bench: Bench) -> None:
    """OIP sequences and native sessions, `oip_sequences` of each, one closed-loop step request at a time."""
    name, n = bench.plan.oip_model, bench.plan.oip_sequences
    job = dict(steps=1, input_size=MODELS[name][0], model=name)
    runs = collections.defaultdict(list)
    with bench.server(name) as on:
        for repeat in range(bench.plan.repeats):
            for pair in OIP_PAIRS:
                for config, kind in pair:
                    figures = bench.measure(kind, on.address, n, clients=1, **job)
                    runs[config].append(figures)
                    bench.progress(f"oip {name} n={n} {repeat + 1}/{bench.plan.repeats} {config:22s} "
                                   f"{figures['throughput']:8.0f} steps/s p99 {figures['p99'] * 1e3:7.2f} ms")
    bench.results["oip"].append({"model": name, "sequences": n,
                                 "configs": {config: median_of(r) for config, r in runs.items()}})


def targets(results: dict) -> list[tuple[str, float, str, bool]]:
    """`(target, ratio, bound, met)` for each of these scenarios' targets that the run measured."""
    found = []
    for row in results.get("merged", []):
        c = row["configs"]
        ratio = _ratio(c[MERGED]["throughput"], c[UNMERGED]["throughput"])
        found.append((f"Predict {row['model']} [{row['seq_len']}, {row['batch']}] x{row['callers']} callers: "
                      "merged / unmerged steps/s", ratio, ">= 1.8", ratio >= 1.8))
    for row in results.get("oip", []):
        c = row["configs"]
        for (oip_config, _), (native, _) in OIP_PAIRS:
            ratio = _ratio(c[oip_config]["throughput"], c[native]["throughput"])
            found.append((f"{oip_config} {row['model']} @{row['sequences']} / {native}", ratio, ">= 0.8",
                          ratio >= 0.8))
        p99 = _ratio(c["OIP ModelStreamInfer"]["p99"], c["native Stream"]["p99"])
        found.append((f"OIP ModelStreamInfer {row['model']} @{row['sequences']}: p99 / native Stream p99", p99,
                      "<= 1.5", p99 <= 1.5))
    return found


def markdown(results: dict) -> str:
    parts = []
    rows = [[r["model"], f"[{r['seq_len']}, {r['batch']}]", r["callers"] if config != ONE_CALLER else 1, config,
             _n(f["throughput"]), _ms(f.get("p99")), _n(f.get("merged_requests"))]
            for r in results.get("merged", []) for config, f in r["configs"].items()]
    if rows:
        parts.append("### Predict, concurrent callers (steps/s; p99 per call in ms)\n\n" + _table(
            ["model", "[seq_len, batch]", "callers", "config", "steps/s", "p99", "requests merged"], rows))
    rows = [[r["model"], r["sequences"], config, _n(f["throughput"]), _ms(f["p99"])]
            for r in results.get("oip", []) for config, f in r["configs"].items()]
    if rows:
        parts.append("### Open Inference Protocol sequences (tritonclient.grpc.aio) against the native API\n\n"
                     + _table(["model", "sequences", "config", "steps/s", "p99"], rows))
    found = targets(results)
    if found:
        parts.append("### Targets of these scenarios\n\n" + _table(
            ["target", "ratio", "bound", ""],
            [[name, _n(ratio, 2), bound, "met" if met else "NOT met"] for name, ratio, bound, met in found]))
    return "".join(part + "\n\n" for part in parts)


def plot(results: dict, path) -> bool:
    """Steps/s of each configuration, one panel per scenario: merged Predicts, and OIP beside native."""
    panels = [(f"Predict [{r['seq_len']}, {r['batch']}], {r['callers']} callers ({r['model']})", r["configs"])
              for r in results.get("merged", [])]
    panels += [(f"sequences, {r['sequences']} at once ({r['model']})", r["configs"]) for r in results.get("oip", [])]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, configs) in zip(axes[0], panels, strict=True):
        names = list(configs)
        axis.barh(names, [configs[name]["throughput"] for name in names])
        axis.set_title(title)
        axis.set_xlabel("steps/s")
        axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
