"""orthora.diagnostics: rotation angles, weight change, hyperspherical energy and representation shift."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from peft import LoraConfig, OFTConfig, get_peft_model
from tiny_models import batch_for, tiny_bert

import orthora
from orthora import diagnostics


def _orthora(side: str = "output", init_weights: bool = True, magnitude: bool = False, **kwargs):
    config = orthora.OrthoConfig(
        task_type="SEQ_CLS",
        target_modules=["query", "value"],
        block_size=16,
        side=side,
        init_weights=init_weights,
        magnitude=magnitude,
        **kwargs,
    )
    return get_peft_model(tiny_bert(), config)


def _brute_force_energy(weight: torch.Tensor) -> float:
    units = torch.nn.functional.normalize(weight.double(), dim=1)
    return sum(
        1.0 / float((units[i] - units[j]).norm()) for i, j in itertools.combinations(range(len(units)), 2)
    )


def test_report_has_one_row_per_module_and_side_with_documented_keys():
    rows = diagnostics.layer_report(_orthora(side="both"))
    assert len(rows) == 2 * 2 * 2  # 2 layers x (query, value) x 2 sides
    assert all(tuple(row) == diagnostics.REPORT_KEYS for row in rows)
    assert {row["side"] for row in rows} == {"output", "input"}
    assert rows[0]["module"] == "bert.encoder.layer.0.attention.self.query"
    assert rows[0]["trainable_params"] == 4 * 16 * 15 // 2  # 64 wide: 4 blocks of 16


def test_identity_adapter_reports_no_change():
    model = _orthora()
    rows = diagnostics.layer_report(model)
    for row in rows:
        assert row["distance_from_identity"] == 0
        assert row["max_angle"] == 0 and row["relative_weight_change"] == 0
        assert row["hyperspherical_energy_adapted"] == pytest.approx(
            row["hyperspherical_energy_base"], rel=1e-12
        )
    shift = diagnostics.representation_shift(None, model, batch_for("cls"))
    assert shift["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(shift["per_layer_mean_cosine"]) == 3  # embeddings + 2 layers


def test_angles_and_distance_of_a_known_plane_rotation():
    """exp of a generator with a single entry theta rotates one plane by theta: eigen-angles +-theta, 0."""
    theta = 0.7
    model = _orthora(parametrization="exp", generator_scale=1.0)  # the stored entry is the generator's
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.ortho_out["default"].weight[0, 0] = theta  # block 0, entry (0, 1) of the generator
    row = diagnostics.layer_report(model)[0]
    assert row["max_angle"] == pytest.approx(theta, abs=1e-6)
    assert row["mean_angle"] == pytest.approx(2 * theta / 64, abs=1e-6)  # two of 4 x 16 eigenvalues move
    assert row["distance_from_identity"] == pytest.approx(math.sqrt(4 - 4 * math.cos(theta)), abs=1e-6)
    assert row["orthogonality_error"] < 1e-6
    weight = layer.get_base_layer().weight.detach().double()
    delta = layer.get_delta_weight("default").double()
    assert row["relative_weight_change"] == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-6)


def test_input_side_rotation_keeps_hyperspherical_energy_output_side_does_not():
    rows_in = diagnostics.layer_report(_orthora(side="input", init_weights=False))
    for row in rows_in:
        assert row["hyperspherical_energy_adapted"] == pytest.approx(
            row["hyperspherical_energy_base"], rel=1e-6
        )  # float32 R
    rows_out = diagnostics.layer_report(_orthora(side="output", init_weights=False))
    changes = [
        abs(r["hyperspherical_energy_adapted"] / r["hyperspherical_energy_base"] - 1) for r in rows_out
    ]
    assert max(changes) > 1e-4  # rows are mixed, so the energy moves


def test_hyperspherical_energy_matches_brute_force_and_sampling_estimates_it():
    weight = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    exact = _brute_force_energy(weight)
    assert diagnostics.hyperspherical_energy(weight) == pytest.approx(exact, rel=1e-10)
    sampled = diagnostics.hyperspherical_energy(weight, max_neurons=30)
    assert sampled != pytest.approx(exact, rel=1e-10)  # it really sampled
    assert sampled == pytest.approx(exact, rel=0.15)


def test_peft_lora_rows_use_the_effective_weight_change():
    model = get_peft_model(
        tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=4, init_lora_weights=False)
    )
    rows = diagnostics.layer_report(model)
    assert len(rows) == 2 and rows[0]["method"] == "peft-lora"
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    weight = layer.get_base_layer().weight.detach().double()
    delta = (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    ).detach().double() * layer.scaling["default"]
    assert rows[0]["relative_weight_change"] == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-6)
    assert rows[0]["max_angle"] is None and rows[0]["trainable_params"] == 4 * 64 * 2
    assert rows[0]["hyperspherical_energy_adapted"] == pytest.approx(
        _brute_force_energy(weight + delta), rel=1e-8
    )
    summary = diagnostics.model_summary(rows)
    assert summary["methods"] == ["peft-lora"] and summary["max_angle"] is None


def test_peft_oft_rows_read_its_rotation():
    config = OFTConfig(
        task_type="SEQ_CLS",
        target_modules=["query"],
        oft_block_size=16,
        r=0,
        use_cayley_neumann=False,
        init_weights=False,
    )
    rows = diagnostics.layer_report(get_peft_model(tiny_bert(), config))
    assert rows[0]["method"] == "peft-oft" and rows[0]["side"] == "input"
    assert rows[0]["orthogonality_error"] < 1e-5 and rows[0]["max_angle"] > 0
    assert rows[0]["hyperspherical_energy_adapted"] == pytest.approx(
        rows[0]["hyperspherical_energy_base"], rel=1e-6
    )


def test_model_summary_aggregates_rows():
    rows = diagnostics.layer_report(_orthora(init_weights=False))
    summary = diagnostics.model_summary(rows)
    assert tuple(summary) == diagnostics.SUMMARY_KEYS
    assert summary["trainable_params"] == sum(r["trainable_params"] for r in rows)
    assert summary["max_angle"] == max(r["max_angle"] for r in rows)
    expected = math.sqrt(sum(r["weight_change_norm"] ** 2 for r in rows)) / math.sqrt(
        sum(r["weight_norm"] ** 2 for r in rows)
    )
    assert summary["relative_weight_change"] == pytest.approx(expected)
    assert summary["hyperspherical_energy_base"] == pytest.approx(
        sum(r["hyperspherical_energy_base"] for r in rows)
    )


def test_representation_shift_sees_a_rotated_model_move():
    model = _orthora(init_weights=False)
    shift = diagnostics.representation_shift(None, model, batch_for("cls"))
    assert shift["mean_cosine"] < 0.99999 and shift["min_cosine"] <= shift["mean_cosine"]
    assert shift["per_layer_mean_cosine"][0] == pytest.approx(1.0)  # embeddings are not adapted


def test_unknown_adapter_is_named():
    with pytest.raises(ValueError, match="'missing'.*default"):
        diagnostics.layer_report(_orthora(), adapter_name="missing")


@pytest.mark.parametrize(
    ("method", "adapter", "logged"),
    [
        ("orthora", {"block_size": 16, "target_modules": ["query", "value"]}, True),
        ("lora", {"r": 4, "target_modules": ["query", "value"]}, True),
        (
            "hra",
            {"r": 2, "target_modules": ["query", "value"]},
            False,
        ),  # no report for HRA: a note, no values
    ],
)
def test_training_engine_logs_the_summary_at_each_evaluation(
    method, adapter, logged, tiny_train_models, task_files, tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orthora.train import TrainConfig, run

    train, dev = task_files("sst2", 16, 8)
    config = TrainConfig(
        task="glue",
        task_name="sst2",
        model_name_or_path=tiny_train_models["bert"],
        method=method,
        adapter=adapter,
        train_file=train,
        validation_file=dev,
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        max_train_steps=4,
        eval_steps=2,
        learning_rate=5e-3,
        checkpointing_steps=None,
        report_to="tensorboard",
    )
    run(config)
    events = EventAccumulator(str(next((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")))).Reload()
    tags = events.Tags()["scalars"]
    if not logged:
        assert not any(tag.startswith("diagnostics/") for tag in tags)
        assert "diagnostics are not logged: " in capsys.readouterr().out
        return
    changes = events.Scalars("diagnostics/relative_weight_change")
    assert [e.step for e in changes] == [2, 4] and changes[-1].value > 0
    assert "diagnostics/hyperspherical_energy_base" in tags
    assert ("diagnostics/max_angle" in tags) == (method == "orthora")  # LoRA has no rotation angle


def test_merged_adapter_is_refused_with_the_module_named():
    model = _orthora(init_weights=False)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"layer.0.attention.self.query: adapter 'default' is merged"):
        diagnostics.layer_report(model)
    model.unmerge_adapter()
    assert diagnostics.layer_report(model)[0]["relative_weight_change"] > 0


def test_magnitude_gets_its_own_row():
    model = _orthora(magnitude=True)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.ortho_magnitude["default"].weight.fill_(2.0)
    rows = [r for r in diagnostics.layer_report(model) if r["side"] == "magnitude"]
    assert len(rows) == 4 and rows[0]["method"] == "orthora-magnitude" and rows[0]["trainable_params"] == 64
    assert rows[0]["relative_weight_change"] == pytest.approx(1.0)  # W' = 2 W
    assert rows[1]["relative_weight_change"] == 0 and rows[0]["max_angle"] is None
    # scaling a neuron does not move its direction: the energy is unchanged
    assert rows[0]["hyperspherical_energy_adapted"] == pytest.approx(rows[0]["hyperspherical_energy_base"])
