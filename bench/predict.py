"""The Predict scenario of issue 3: whole sequences over gRPC, beside the same calls in-process."""

import statistics

import numpy as np

from bench.harness import Bench
from bench.inproc import InProcessModel
from bench.plan import MODELS


def run(bench: Bench) -> None:
    """Predict calls over gRPC at each shape, then the same shapes in-process."""
    name = bench.plan.predict_model
    input_size = MODELS[name][0]
    rows = []
    with bench.server(name) as on:
        for seq_len, batch in bench.plan.predict_shapes:
            seconds = []
            for _ in range(bench.plan.repeats):
                result = bench.pool.run(
                    [
                        dict(
                            kind="predict",
                            address=on.address,
                            seq_len=seq_len,
                            batch=batch,
                            input_size=input_size,
                            calls=bench.plan.predict_calls,
                        )
                    ]
                )[0]
                seconds.append(float(np.median(result["latencies"])))
            rows.append(
                {
                    "model": name,
                    "seq_len": seq_len,
                    "batch": batch,
                    "server_seconds": statistics.median(seconds),
                    "runs": seconds,
                }
            )
            bench.progress(
                f"predict {name} seq_len {seq_len} batch {batch}: {rows[-1]['server_seconds'] * 1e3:.1f}"
                " ms per call over gRPC"
            )
    model = InProcessModel(bench.model_path(name), bench.plan.torch_threads, bench.plan.device)
    for row in rows:
        row["inprocess_seconds"] = model.seconds_per_call(
            row["seq_len"], row["batch"], min_calls=bench.plan.predict_calls
        )
        bench.progress(
            f"predict {name} seq_len {row['seq_len']} batch {row['batch']}: "
            f"{row['inprocess_seconds'] * 1e3:.1f} ms per call in-process"
        )
    bench.results["predict"].extend(rows)
