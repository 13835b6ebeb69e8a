import benchmarks.train_throughput as tt


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
