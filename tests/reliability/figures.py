"""What the reliability suite measured, printed as one table at the end of the run (`make reliability`)."""

import collections
import dataclasses
import os

FULL = os.environ.get("LSTMSERVE_RELIABILITY", "reduced") == "full"


def scale(reduced: int, full: int) -> int:
    """A size for `make test` (reduced) or for `make reliability` (LSTMSERVE_RELIABILITY=full)."""
    return full if FULL else reduced


@dataclasses.dataclass
class Figures:
    load: dict = dataclasses.field(default_factory=dict)
    faults: dict = dataclasses.field(
        default_factory=lambda: collections.defaultdict(
            lambda: {"runs": 0, "acked_lost": 0, "applied_twice": 0}
        )
    )
    bad_inputs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    state_mismatches: int = 0

    def fault(self, name: str, acked_lost: int = 0, applied_twice: int = 0) -> None:
        row = self.faults[name]
        row["runs"] += 1
        row["acked_lost"] += acked_lost
        row["applied_twice"] += applied_twice

    def lines(self) -> list[str]:
        if not (self.load or self.faults or self.bad_inputs):
            return []
        out = [f"lstmserve reliability summary ({'full' if FULL else 'reduced'} size)", ""]
        if self.load:
            out.append("load held:")
            out += [f"  {key:<28} {value}" for key, value in self.load.items()]
        if self.faults:
            out.append("faults survived:                runs  acked steps lost  applied twice")
            out += [
                f"  {name:<28} {row['runs']:>5}  {row['acked_lost']:>16}  {row['applied_twice']:>13}"
                for name, row in sorted(self.faults.items())
            ]
        if self.bad_inputs:
            out.append("bad inputs tried:")
            self.bad_inputs.setdefault("undocumented status codes", 0)
            out += [f"  {key:<28} {value}" for key, value in sorted(self.bad_inputs.items())]
        out.append(f"state mismatches found:          {self.state_mismatches}")
        return out


FIGURES = Figures()
