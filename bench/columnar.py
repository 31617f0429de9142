"""The columnar form (StreamColumns, one `[sessions, 1, input]` tensor per message, closed loop on one stream)
against the transport limit of the entry-by-entry form (the echo's StreamBatch: the issue's target), the echo's
own StreamColumns (the columnar transport limit), and the model in-process at the batch the server formed."""

import collections
import statistics

from bench.harness import IN_PROCESS, Bench, median_of
from bench.inproc import InProcessModel
from bench.plan import MODELS
from bench.tables import _ms, _n, _ratio, _table

# config -> (which server, the load's kind)
CONFIGS = {"echo StreamBatch": ("echo", "batch"), "echo StreamColumns": ("echo", "columns"),
           "server StreamColumns": ("server", "columns")}


def run(bench: Bench) -> None:
    name = bench.plan.columnar_model
    input_size = MODELS[name][0]
    rows = []
    with bench.server(name, "-columnar", max_batch_entries=max(bench.plan.columnar_sessions)) as on, \
            bench.echo(name) as echo:
        children = {"server": on, "echo": echo}
        for n in bench.plan.columnar_sessions:
            runs, batches = collections.defaultdict(list), []
            for repeat in range(bench.plan.repeats):
                for config, (child, kind) in CONFIGS.items():
                    before = (on.metric("lstmserve_batch_size_sum"), on.metric("lstmserve_batch_size_count"))
                    figures = bench.measure(kind, children[child].address, n, clients=1, steps=1,
                                            input_size=input_size, streams=1)
                    runs[config].append(figures)
                    if child == "server":
                        batches.append((on.metric("lstmserve_batch_size_sum") - before[0])
                                       / max(1.0, on.metric("lstmserve_batch_size_count") - before[1]))
                    bench.progress(f"columnar {name} {n} sessions {repeat + 1}/{bench.plan.repeats} {config:20s} "
                                   f"{figures['throughput']:9.0f} steps/s p99 {figures['p99'] * 1e3:.1f} ms")
            rows.append({"model": name, "sessions": n, "formed_batch": statistics.median(batches),
                         "configs": {config: median_of(r) for config, r in runs.items()}})
    model = InProcessModel(bench.model_path(name), bench.plan.torch_threads, bench.plan.device)
    for row in rows:
        batch = max(1, round(row["formed_batch"]))
        row["configs"][IN_PROCESS] = {"throughput": model.steps_per_second(1, batch), "batch": batch}
        c = row["configs"]  # the target, read by bench/targets.py
        row["server_over_echo_batch"] = _ratio(c["server StreamColumns"]["throughput"],
                                               c["echo StreamBatch"]["throughput"])
        bench.progress(f"columnar {name} {row['sessions']} sessions in-process at batch {batch}: "
                       f"{row['configs'][IN_PROCESS]['throughput']:9.0f} steps/s")
    bench.results["columnar"].extend(rows)


def markdown(results: dict) -> str:
    rows = []
    for row in results.get("columnar", []):
        c = row["configs"]
        server = c["server StreamColumns"]["throughput"]
        rows.append([row["model"], row["sessions"], _n(server), _ms(c["server StreamColumns"]["p99"]),
                     _n(c["echo StreamBatch"]["throughput"]), _n(c["echo StreamColumns"]["throughput"]),
                     f"{_n(c[IN_PROCESS]['throughput'])} (b={c[IN_PROCESS]['batch']})",
                     _n(row["server_over_echo_batch"], 2),
                     _n(_ratio(server, c["echo StreamColumns"]["throughput"]), 2),
                     _n(_ratio(server, c[IN_PROCESS]["throughput"]), 2)])
    if not rows:
        return ""
    return ("\n### Columnar (StreamColumns, one stream, closed loop; steps/s, p99 per message in ms)\n\n"
            + _table(["model", "sessions", "server", "p99", "echo StreamBatch", "echo StreamColumns",
                      "in-process (formed batch)", "server / echo StreamBatch", "server / echo StreamColumns",
                      "server / in-process"], rows) + "\n")
