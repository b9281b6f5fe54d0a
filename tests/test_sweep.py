"""Notebook 05's sweep logic: the grid, resumability, the choice rule and the generated
conclusion."""

import pytest

from nbutils import config, evaluation, files, pipeline, sweep

DEFAULTS = {"rank": 8, "targets": "query,value", "learning_rate": 5e-4, "alpha": 0, "quantize": ""}


def test_grid_expands_fills_defaults_and_refuses_unknown_keys():
    configs = sweep.expand({"rank": [1, 4, 16], "targets": ["query,value", "all"]}, DEFAULTS)
    assert len(configs) == 6 and all(
        c["learning_rate"] == 5e-4 and c["alpha"] == c["rank"] for c in configs
    )
    assert len({sweep.config_name(c) for c in configs}) == 6
    explicit = sweep.expand(
        [{"rank": 2}, {"rank": 2, "alpha": 2}, {"rank": 2, "learning_rate": 1e-3}], DEFAULTS
    )
    assert [sweep.config_name(c) for c in explicit] == [
        "r2-query+value-lr0.0005-a2",
        "r2-query+value-lr0.001-a2",
    ]
    with pytest.raises(ValueError, match=r"SWEEP: unknown key\(s\) \['ranks'\]"):
        sweep.expand({"ranks": [1]}, DEFAULTS)
    with pytest.raises(ValueError, match="SWEEP: rank 8.0 must be a positive integer"):
        sweep.expand({"rank": [8.0]}, DEFAULTS)
    with pytest.raises(ValueError, match="unknown target 'mlp'"):
        sweep.expand({"targets": ["mlp"]}, DEFAULTS)
    int8 = sweep.expand({"rank": [2], "quantize": ["", "int8"]}, DEFAULTS)
    assert [sweep.config_name(c) for c in int8] == [
        "r2-query+value-lr0.0005-a2",
        "r2-query+value-lr0.0005-a2-int8",
    ]
    with pytest.raises(ValueError, match="quantize 'int4'"):
        sweep.expand({"quantize": ["int4"]}, DEFAULTS)


def test_finished_configurations_are_kept_and_another_budget_is_refused(tmp_path):
    # a tuple comes back from JSON as a list
    budget = {"max_steps": 100, "seed": 0, "shape": (1, 2)}
    assert sweep.finished(tmp_path / "r1", budget) is None
    files.write_json(tmp_path / "r1" / "result.json", {"name": "r1", "budget": budget})
    assert sweep.finished(tmp_path / "r1", budget)["name"] == "r1"
    with pytest.raises(
        ValueError, match="trained with another budget \\(changed: max_steps\\); use a new RUN_ID"
    ):
        sweep.finished(tmp_path / "r1", {"max_steps": 200, "seed": 0, "shape": (1, 2)})


def scores(right: int, n: int = 40) -> list[dict]:
    """Validation scores where the first ``right`` answers equal their reference."""
    preds = [
        {
            "id": str(i),
            "reference": f"returns the value {i}",
            "prediction": f"returns the value {i}" if i < right else "zzz",
            "stopped": True,
            "n_tokens": 4,
        }
        for i in range(n)
    ]
    return evaluation.score_rows(preds)


def result(name: str, params: int, val: list[dict]) -> dict:
    return {
        "name": name,
        "trainable_params": params,
        "val_rougeL_f1": evaluation.aggregate(val)["rougeL_f1"],
        "best_val_loss": 1.0,
    }


def test_choice_is_the_smallest_within_noise_of_the_best():
    val = {"big": scores(30), "mid": scores(29), "tiny": scores(5)}
    results = [
        result("big", 1000, val["big"]),
        result("mid", 100, val["mid"]),
        result("tiny", 10, val["tiny"]),
    ]
    choice = sweep.choose(results, val, 500, 0)
    assert (
        choice["best"] == "big"
        and choice["candidates"] == ["big", "mid"]
        and choice["chosen"] == "mid"
    )
    text = sweep.conclusion(choice, results)
    assert "Best validation ROUGE-L: big (0.750, 1,000 trainable parameters)" in text
    assert (
        "Chosen: mid, the smallest of those (100 parameters, 10% of the best's; validation ROUGE-L 0.725)"
        in text
    )
    alone = sweep.choose(
        results[:1] + results[2:], {"big": val["big"], "tiny": val["tiny"]}, 500, 0
    )
    assert alone["chosen"] == "big" and "below it beyond bootstrap noise" in sweep.conclusion(
        alone, results
    )


def test_choice_parameters_feed_the_pipeline():
    chosen = {"rank": 4, "targets": "all", "learning_rate": 1e-3, "alpha": 4.0}
    assert sweep.choice_parameters(chosen) == {
        "RANK": 4,
        "LORA_TARGETS": "all",
        "LEARNING_RATE": 1e-3,
        "LORA_ALPHA": 4.0,
    }
    config.check_all(sweep.choice_parameters(chosen))  # what --params FILE checks
    assert pipeline.notebook_parameters("cpu", sweep.choice_parameters(chosen))["RANK"] == 4


def test_report_table_formats_numbers_and_intervals():
    from nbutils import report

    table = report.table(
        [
            {
                "name": "r2",
                "ci": [-0.13303, 0.05294],
                "params": 516096,
                "lr": 0.0005,
                "loss": 2.86812,
            }
        ],
        ("name", "ci", "params", "lr", "loss"),
    )
    assert table.splitlines()[2] == "| r2 | [-0.133, 0.053] | 516,096 | 0.0005 | 2.868 |"


def test_an_int8_choice_is_passed_on_not_dropped():
    chosen = {"rank": 2, "targets": "all", "learning_rate": 5e-4, "alpha": 2.0, "quantize": "int8"}
    # the pipeline refuses it for the profiles that run 03 (until 03/04 take it), in one line
    assert sweep.choice_parameters(chosen)["QUANTIZE"] == "int8"
    with pytest.raises(SystemExit, match="-p QUANTIZE: only notebook"):
        pipeline.notebook_parameters("cpu", sweep.choice_parameters(chosen))


def test_variants_and_decoding_are_keys_named_and_passed_on():
    configs = sweep.expand(
        [{}, {"scaling": "rslora"}, {"loraplus_ratio": 16}, {"dora": True}, {"neftune_alpha": 5}]
        + [{"sampler": "beam:4"}, {"min_new_tokens": 8}, {"dora": True, "sampler": "beam:4"}],
        DEFAULTS,
    )
    names = [sweep.config_name(c) for c in configs]
    base = "r8-query+value-lr0.0005-a8"
    assert names == [
        base,
        f"{base}-rslora",
        f"{base}-lp16",
        f"{base}-dora",
        f"{base}-neft5",
        f"{base}-beam4",
        f"{base}-min8",
        f"{base}-dora-beam4",
    ]
    # decoding-only configurations share the adapter trained for their training keys
    finished = [{**c, "name": n} for c, n in zip(configs[:5], names)]
    assert sweep.training_twin(configs[5], finished)["name"] == base
    assert sweep.training_twin(configs[7], finished)["name"] == f"{base}-dora"
    assert sweep.training_twin(configs[1], finished[:1]) is None
    assert sweep.parameters(configs[3])["DORA"] is True
    assert sweep.choice_parameters(configs[7]) == {
        "RANK": 8,
        "LORA_TARGETS": "query,value",
        "LEARNING_RATE": 5e-4,
        "LORA_ALPHA": 8.0,
        "DORA": True,
        "SAMPLER": "beam:4",
    }
    config.check_all(sweep.choice_parameters(configs[7]))
    for bad, message in (
        ({"scaling": "sqrt"}, "SWEEP: LORA_SCALING='sqrt'"),
        ({"loraplus_ratio": 0}, "SWEEP: LORAPLUS_RATIO=0.0"),
        ({"sampler": "beam:1"}, "SWEEP: SAMPLER='beam:1'"),
    ):
        with pytest.raises(ValueError, match=message):
            sweep.expand([bad], DEFAULTS)
