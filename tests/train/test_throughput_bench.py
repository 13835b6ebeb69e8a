import json

import pytest

import benchmarks.train_throughput as tt
from benchmarks import step_ab


def test_interleaved_step_times_alternates_runners_and_reports_medians(monkeypatch):
    calls, clock = [], {"t": 0.0}

    def runner(name, costs):
        costs = iter(costs)

        def step():
            calls.append(name)
            clock["t"] += next(costs)
        return step

    monkeypatch.setattr(tt.time, "perf_counter", lambda: clock["t"])
    # 3 rounds of 2 steps each; runner a has one slow round (a drift), which the median ignores
    out = tt.interleaved_step_times({"a": runner("a", [2, 2, 9, 9, 2, 2]), "b": runner("b", [1, 1, 1, 1, 3, 3])},
                                    total=6, rounds=3)
    assert calls == ["a", "a", "b", "b"] * 3
    assert out == {"a": 2.0, "b": 1.0}


def test_step_ab_times_variants_and_writes_results(tmp_path):
    step_ab.main(["", "model.query_blocks=2", "--size", "tiny", "--steps", "2", "--workdir", str(tmp_path)])
    out = json.load(open(tmp_path / "results.json"))
    assert [r["variant"] for r in out["rows"]] == ["(config)", "model.query_blocks=2"]
    assert all(len(r["steps_ms"]) == 2 and r["median_ms"] > 0 for r in out["rows"])
    assert (tmp_path / "step_ab.png").stat().st_size > 0
    with pytest.raises(KeyError, match="query_blockz"):
        step_ab.main(["model.query_blockz=2", "--size", "tiny", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="variants must differ"):
        step_ab.main(["", "", "--size", "tiny", "--workdir", str(tmp_path)])
