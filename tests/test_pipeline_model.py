"""The pipeline cost model (mlaan.bench.pipeline_model): its formulas on hand-made inputs, and the multi-device
prediction from a saved pipeline.json (``mlaan bench pipeline --predict-from``). No timing is asserted."""

import json

import pytest

from mlaan.bench.pipeline_model import (
    DEFAULT_LAYOUTS,
    Link,
    bp_1f1b_step,
    bp_stages,
    bp_time_stages,
    bubble_fraction,
    local_pipeline_step,
    multi_device_prediction,
    needed_batches,
    parse_layouts,
    predicted_tick,
    ring_all_reduce_s,
    stage_ticks,
    twin_state_seconds,
)

LINK = Link(latency_s=1e-3, bytes_per_s=1e9)


def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1():
    assert bubble_fraction(1, 4) == 0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert [bubble_fraction(4, m) for m in (1, 2, 4, 8, 16)] == sorted(
        (bubble_fraction(4, m) for m in (1, 2, 4, 8, 16)), reverse=True)
    with pytest.raises(ValueError, match="at least one stage and one micro-batch"):
        bubble_fraction(0, 4)


def test_one_stage_one_micro_batch_is_the_sum_of_the_blocks():
    times = [0.1, 0.2, 0.3, 0.05]
    assert bp_1f1b_step(times, [range(0, 4)], 1) == pytest.approx(sum(times))
    assert predicted_tick(times, [range(0, 4)], 0.5, cascade_wait=1) == pytest.approx(sum(times))
    assert stage_ticks(times, [range(0, 4)], 0.5, 0) == [pytest.approx(sum(times))]


def test_1f1b_is_m_plus_p_minus_1_ticks_on_balanced_stages():
    times = [0.2, 0.1, 0.1, 0.2, 0.2, 0.1]  # 0.3 a stage
    sent = [1e6] * 6  # block i's output bytes for one micro-batch
    step = bp_1f1b_step(times, [range(0, 2), range(2, 4), range(4, 6)], 4, sent, Link(0.0, 1e12))
    assert step == pytest.approx((4 + 3 - 1) * 0.3, rel=1e-4)


def test_1f1b_on_unbalanced_stages_crosses_every_stage_once_and_queues_at_the_slowest():
    times = [0.1, 0.1, 0.3, 0.1]  # stage 1 (blocks 2-3) is the slowest
    sent = [1e6, 2e6, 3e6, 4e6]  # block i's output bytes for one micro-batch
    step = bp_1f1b_step(times, [range(0, 2), range(2, 4)], 3, sent, LINK)
    # across the cut after block 1: its output forward (stage 0), its gradient back (stage 1), 2 MB each
    slow, fast = 0.4 + LINK.seconds(2e6), 0.2 + LINK.seconds(2e6)
    assert step == pytest.approx(fast + slow + (3 - 1) * slow)
    assert step < (3 + 2 - 1) * slow
    with pytest.raises(ValueError, match="needs a link"):
        bp_1f1b_step(times, [range(0, 2), range(2, 4)], 3, sent)


def test_1f1b_step_falls_with_more_micro_batches_when_work_divides_linearly():
    per_image = [0.01, 0.02, 0.02, 0.01]
    batch, stages = 64, [range(0, 2), range(2, 4)]
    steps = [bp_1f1b_step([t * batch / m for t in per_image], stages, m, [0.0] * 4, Link(0.0, 1e9))
             for m in (1, 2, 4, 8)]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]


def test_ring_all_reduce_and_one_replica_adds_nothing():
    assert ring_all_reduce_s(1e9, 1, LINK) == 0
    assert ring_all_reduce_s(1e9, 2, LINK) == pytest.approx(2 * 1e-3 + 1.0)
    assert ring_all_reduce_s(1e9, 4, LINK) == pytest.approx(6 * 1e-3 + 1.5)
    times, ranges = [0.1, 0.2, 0.3, 0.1], [range(0, 2), range(2, 4)]
    alone = local_pipeline_step(times, ranges, 0.01, 0)
    assert alone == predicted_tick(times, ranges, 0.01, 0) == pytest.approx(0.4)  # stage 0: 0.3 + 0.01
    assert local_pipeline_step(times, ranges, 0.01, 0, [1e9, 1e9], replicas=1, link=LINK) == alone
    # two replicas: each stage adds its own all-reduce, the slowest sum sets the step
    assert local_pipeline_step(times, ranges, 0.01, 0, [1e9, 0.0], replicas=2, link=LINK) == pytest.approx(
        0.31 + 1.002)
    with pytest.raises(ValueError, match="parameter bytes and a link"):
        local_pipeline_step(times, ranges, 0.01, 0, replicas=2)


def test_stage_ticks_per_boundary_messages_and_cascade_wait():
    times = [1.0, 2.0, 3.0, 4.0]
    ranges = [range(0, 1), range(1, 3), range(3, 4)]
    # stage 0: its module + send + (cascade) stage 1's first module + gradient back
    assert stage_ticks(times, ranges, [0.1, 0.2], 1) == pytest.approx([1.0 + 0.1 + 2.0 + 0.1, 5.0 + 0.2 + 4.0 + 0.2,
                                                                       4.0])
    assert stage_ticks(times, ranges, 0.1, 0) == pytest.approx([1.1, 5.1, 4.0])


def test_bp_stages_are_contiguous_blocks_with_the_head_last():
    assert bp_stages([1.0] * 16, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 17)]
    assert bp_stages([1.0] * 16, 1) == [range(0, 17)]
    # by time: the head's cost counts with the block before it
    assert bp_time_stages([3.0, 1.0, 1.0, 0.5, 0.5], 2) == [range(0, 1), range(1, 5)]
    assert bp_time_stages([1.0, 1.0, 1.0, 1.0, 2.0], 2) == [range(0, 3), range(3, 5)]


def test_layouts_and_the_batches_they_need():
    assert parse_layouts("1x2, 2×4,4X2") == [(1, 2), (2, 4), (4, 2)]
    with pytest.raises(ValueError, match="R×P items"):
        parse_layouts("2by2")
    with pytest.raises(ValueError, match="at least 1"):
        parse_layouts("0x2")
    local, bp = needed_batches(128, DEFAULT_LAYOUTS)
    assert local == [32, 64, 128]
    assert bp == [8, 16, 32, 64, 128]
    assert needed_batches(8, [(2, 4)]) == ([8], [8])  # 8 images do not make 2 × 8 micro-batches


def _linear_profile(batches, modules=4, blocks=5):
    """Per-image times, output bytes and parameter bytes made by hand: every unit costs 1 ms an image."""
    def part(units):
        return {"seconds": {str(b): [1e-3 * b] * units for b in batches},
                "output_bytes_per_image": [1000.0] * units, "parameter_bytes": [1e6] * units}
    return {"local": part(modules), "bp": part(blocks)}


def test_multi_device_prediction_on_a_hand_made_profile():
    config = {"method": "dgl", "batch_size": 16, "boundary": "exact"}
    layouts = [(1, 2), (2, 2), (1, 8), (4, 4)]
    profile = _linear_profile([1, 2, 4, 8, 16])
    result = multi_device_prediction(config, profile, Link(0.0, 1e12), layouts)
    assert result["one_device"] == {"local_s": pytest.approx(0.064), "bp_s": pytest.approx(0.08)}
    assert [(r["replicas"], r["stages"]) for r in result["rows"]] == [(1, 2), (2, 2)]
    assert len(result["skipped"]) == 2 and "cannot be split over 8" in result["skipped"][0]
    one_by_two = result["rows"][0]
    assert one_by_two["local_s"] == pytest.approx(0.032) and one_by_two["local_speedup"] == pytest.approx(2.0)
    m2, m4 = one_by_two["bp"]
    assert (m2["micro_batches"], m2["micro_batch"], m4["micro_batch"]) == (2, 8, 4)
    # blocks 0-1 | 2-4 (the head with the last stage) cost 2 and 3 blocks of 8 images: 2 + 3 + (2 - 1) × 3
    assert m2["s"] == pytest.approx((2 + 3 + 3) * 8e-3, rel=1e-6)
    assert m2["bubble"] == pytest.approx(1 / 3)
    assert m2["local_over_bp"] == pytest.approx(0.032 / m2["s"])
    assert result["rows"][1]["images_per_replica"] == 8


def _saved_run(tmp_path):
    """A saved 2-rank `bench pipeline` result of dgl+mlaan on resnet20 K=4 (its pipeline.json path)."""
    saved = {"config": {"arch": "resnet20", "method": "dgl+mlaan", "k": 4, "ranks": 2, "cores": 2,
                        "batch_size": 8, "boundary": "exact"},
             "window": 2, "code": "abc1234", "module_times": [0.01, 0.02, 0.02, 0.01],
             "message": {"latency_s": 1e-4, "bytes_per_s": 2e9}}
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(saved))
    return path


def test_predict_from_a_saved_pipeline_json(tmp_path, capsys):
    from mlaan.cli import main

    path = _saved_run(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "pipeline", "--predict-from", str(path), "--layouts", "1x2,2x2,1x8",
                 "--predict-repeats", "1", "--bandwidth", "5e10", "--output-dir", str(out)]) == 0
    result = json.loads((out / "multi_device.json").read_text())
    assert [(r["replicas"], r["stages"]) for r in result["rows"]] == [(1, 2), (2, 2)]
    assert result["link"] == {"latency_s": 1e-4, "bytes_per_s": 5e10} and result["link_source"] == "given"
    assert set(result["profile"]["bp"]["seconds"]) == {"1", "2", "4", "8"}  # 2 × 2, M = 4: 1 image
    assert set(result["profile"]["local"]["seconds"]) == {"4", "8"}
    assert all(r["local_s"] > 0 and all(b["s"] > 0 for b in r["bp"]) for r in result["rows"])
    text = capsys.readouterr().out
    assert "multi-device prediction" in text and "| 2 × 2" in text and "skipped 1×8" in text


def test_predict_from_refuses_a_bad_layout(tmp_path, capsys):
    from mlaan.cli import main

    assert main(["bench", "pipeline", "--predict-from", str(tmp_path / "none.json"), "--layouts", "2"]) == 2
    assert "R×P items" in capsys.readouterr().err


def test_twin_facts_name_the_blocks_each_module_s_ema_twins_follow():
    from mlaan import create_local_model
    from mlaan.bench.pipeline_model import twin_facts
    from mlaan.engine.lam import TwinTrunk

    copies = create_local_model("resnet20", method="dgl+mlaan", num_local_modules=4)
    facts = twin_facts(copies)
    assert facts["module_blocks"] == [list(units) for units in copies.split]
    # the paper's trunk: one twin each, of the first block after its module (the next module's first block)
    for trunk in copies.following_trunks():
        owner = next(j for j in range(4) for part in copies.module_parts(j)[1:] if trunk in list(part.modules()))
        assert trunk.source_index in facts["followed_blocks"][owner]
    assert len(facts["block_state_bytes"]) == len(copies.backbone.blocks)
    first = copies.backbone.blocks[0]
    assert facts["block_state_bytes"][0] == sum(v.numel() * v.element_size() for v in first.state_dict().values())

    twins = create_local_model("resnet20", method="dgl+mlaan", num_local_modules=4, lam_trunk="twins")
    facts = twin_facts(twins)
    for j in range(4):
        trunks = [t for part in twins.module_parts(j)[1:] for t in part.modules() if isinstance(t, TwinTrunk)]
        assert facts["followed_blocks"][j] == sorted({i for t in trunks for i in t.indices})
    assert any(len(blocks) > 1 for blocks in facts["followed_blocks"])  # twins reach several blocks ahead
    dgl = create_local_model("resnet20", method="dgl", num_local_modules=4)
    assert twin_facts(dgl)["followed_blocks"] == [[]] * 4


def test_twin_state_seconds_count_only_blocks_trained_on_another_stage():
    local = {"module_blocks": [[0], [1], [2], [3]], "followed_blocks": [[1, 3], [2], [3], []],
             "block_state_bytes": [10.0, 1e6, 2e6, 3e6]}
    link = Link(latency_s=1e-3, bytes_per_s=1e9)
    # stage 0 runs modules 0-1 (blocks 0, 1): needs blocks 2 and 3 from stage 1; stage 1 needs none
    assert twin_state_seconds(local, [range(0, 2), range(2, 4)], link) == pytest.approx(
        [2e-3 + 5e-3, 0.0])
    assert twin_state_seconds(local, [range(0, 4)], link) == [0.0]  # one stage owns every block
    assert twin_state_seconds({"seconds": {}}, [range(0, 2), range(2, 4)], link) == [0.0, 0.0]  # an old profile
    times = [1.0, 1.0, 1.0, 1.0]
    plain = local_pipeline_step(times, [range(0, 2), range(2, 4)], 0.0, 0)
    with_state = local_pipeline_step(times, [range(0, 2), range(2, 4)], 0.0, 0, twin_state_s=[7e-3, 0.0])
    assert with_state == pytest.approx(plain + 7e-3)


def test_predict_a_twins_trunk_from_a_saved_copies_run(tmp_path, capsys):
    from mlaan.cli import main

    out = tmp_path / "out"
    assert main(["bench", "pipeline", "--predict-from", str(_saved_run(tmp_path)), "--layouts", "1x2",
                 "--predict-repeats", "1", "--option", "lam_trunk=twins", "--output-dir", str(out)]) == 0
    result = json.loads((out / "multi_device.json").read_text())
    assert result["options"] == {"lam_trunk": "twins"}
    assert result["saved_local_s"] is None  # the saved run timed another trunk: no comparison of its Σ T_j
    (row,) = result["rows"]
    # the first stage's twins follow blocks of the second: their state is sent every step
    assert row["twin_state_s"][0] > 0 and row["twin_state_s"][-1] == 0
    assert any(len(b) > 1 for b in result["profile"]["local"]["followed_blocks"])
    assert "dgl+mlaan lam_trunk=twins s/step" in capsys.readouterr().out


def test_a_measured_pipeline_refuses_the_twins_trunk_in_one_line(tmp_path, capsys):
    from mlaan.cli import main

    assert main(["bench", "pipeline", "--local-modules", "4", "--arch", "resnet20",
                 "--option", "lam_trunk=twins"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--predict-from PIPELINE_JSON --option lam_trunk=twins" in err and len(err.splitlines()) == 1
    assert main(["bench", "pipeline", "--option", "ema_lag=0"]) == 2
    assert "sets ema_lag 1 itself" in capsys.readouterr().err
    assert main(["bench", "pipeline", "--predict-from", str(_saved_run(tmp_path)), "--option", "lam_depth"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_an_option_the_method_does_not_read_is_refused(tmp_path, capsys):
    from mlaan.cli import main

    saved = json.loads(_saved_run(tmp_path).read_text())
    saved["config"]["method"] = "dgl"
    path = tmp_path / "dgl.json"
    path.write_text(json.dumps(saved))
    assert main(["bench", "pipeline", "--predict-from", str(path), "--option", "lam_trunk=twins"]) == 2
    assert "--option lam_trunk: dgl does not read it" in capsys.readouterr().err
