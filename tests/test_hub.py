"""Sharing adapters through the Hub: the real huggingface_hub client against the loopback `FakeHub` (conftest)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import HUB_TOKEN
from huggingface_hub import HfApi, ModelCard, constants
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_bert

import orthora
from orthora import hub

BASE_REPO = "alice/tiny-bert"
INPUTS = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))


def adapted_model(seed: int = 0, **config):
    """A tiny BERT classifier with a non-trivial orthora adapter (so a wrong or missing load shows in the outputs)."""
    base = tiny_bert(seed=0)
    base.name_or_path = BASE_REPO
    model = get_peft_model(
        base,
        orthora.OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=16, **config),
    )
    # rotation parameters move by 0.1 / generator scale: the same rotations whatever generator_scale is
    scales = {id(m.weight): m.scale for m in model.modules() if isinstance(m, orthora.BlockRotation)}
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 / scales.get(id(param), 1.0) * torch.randn_like(param))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def push_base_model(tmp_path: Path) -> None:
    """Put the tiny base model on the fake Hub, so loaders that build the base from its id can run."""
    folder = tmp_path / "base"
    tiny_bert(seed=0).save_pretrained(folder)
    api = HfApi(token=HUB_TOKEN)
    api.create_repo(BASE_REPO, exist_ok=True)
    api.upload_folder(repo_id=BASE_REPO, folder_path=folder)


def cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts]


def test_push_to_hub_uploads_adapter_and_orthora_card(fake_hub, tmp_path):
    model = adapted_model()
    model.push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)

    files = fake_hub.files("alice/tiny-orthora")
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    model.save_pretrained(tmp_path / "local")
    assert json.loads(files["adapter_config.json"])["peft_type"] == "ORTHORA"
    pushed = tmp_path / "pushed.safetensors"
    pushed.write_bytes(files["adapter_model.safetensors"])
    local = load_file(tmp_path / "local" / "adapter_model.safetensors")
    assert {k: v.tolist() for k, v in load_file(pushed).items()} == {k: v.tolist() for k, v in local.items()}

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_REPO
    assert card.data.pipeline_tag == "text-classification"
    assert {"orthora", "peft", f"base_model:adapter:{BASE_REPO}"} <= set(card.data.tags)
    assert "pip install orthora" in card.text and "import orthora" in card.text
    # the card lists the config's values, whatever the default side is
    side = model.peft_config["default"].side
    assert "| `block_size` | `16` |" in card.text and f'| `side` | `"{side}"` |' in card.text
    stored = sum(t.numel() for t in local.values())
    assert f"{stored:,} parameters in `adapter_model.safetensors`" in card.text
    assert "No evaluation was recorded" in card.text
    card.validate()  # huggingface_hub's own validation, through the (fake) Hub's validate-yaml endpoint


def test_card_loading_snippet_works_when_copied(fake_hub, tmp_path):
    push_base_model(tmp_path)
    model = adapted_model()
    model.push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)
    text = fake_hub.files("alice/tiny-orthora")["README.md"].decode()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet, namespace)  # the card's code, as a user would paste it (it ends by merging in place)
    assert torch.allclose(logits(namespace["merged"].eval()), logits(model), atol=1e-5)


def test_pull_by_hub_id_into_fresh_cache_matches_local_model(fake_hub, tmp_path):
    push_base_model(tmp_path)
    model = adapted_model()
    model.push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)
    assert not (fake_hub.cache / "models--alice--tiny-orthora").exists()
    expected = logits(model)

    pulled = PeftModel.from_pretrained(tiny_bert(seed=0), "alice/tiny-orthora")
    assert torch.equal(logits(pulled.eval()), expected)
    assert torch.equal(logits(hub.attach_adapter(tiny_bert(seed=0), "alice/tiny-orthora").eval()), expected)
    assert torch.equal(
        logits(AutoPeftModelForSequenceClassification.from_pretrained("alice/tiny-orthora").eval()), expected
    )
    assert torch.equal(logits(hub.load_pretrained("alice/tiny-orthora").eval()), expected)
    host = tiny_bert(seed=0)
    host.load_adapter("alice/tiny-orthora")  # transformers' integration
    assert torch.equal(logits(host), expected)


def test_revisions_private_repos_and_tokens(fake_hub):
    first, second = adapted_model(seed=1), adapted_model(seed=2)
    first.push_to_hub("alice/private-orthora", token=HUB_TOKEN, private=True)
    second.push_to_hub("alice/private-orthora", token=HUB_TOKEN, revision="v2")
    assert fake_hub.repos["alice/private-orthora"].private
    assert fake_hub.files("alice/private-orthora", "main") != fake_hub.files("alice/private-orthora", "v2")

    with pytest.raises(hub.HubError, match="not found"):  # private: invisible without a token
        hub.attach_adapter(tiny_bert(seed=0), "alice/private-orthora")
    on_main = hub.attach_adapter(tiny_bert(seed=0), "alice/private-orthora", token=HUB_TOKEN)
    on_v2 = PeftModel.from_pretrained(
        tiny_bert(seed=0), "alice/private-orthora", revision="v2", token=HUB_TOKEN
    )
    assert torch.equal(logits(on_main.eval()), logits(first))
    assert torch.equal(logits(on_v2.eval()), logits(second))


def test_cached_adapter_loads_again_offline(fake_hub, monkeypatch):
    model = adapted_model()
    model.push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)
    hub.download_adapter("alice/tiny-orthora")
    fake_hub.shutdown()  # from here on there is no Hub at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(
        logits(PeftModel.from_pretrained(tiny_bert(seed=0), "alice/tiny-orthora").eval()), logits(model)
    )
    assert torch.equal(
        logits(hub.attach_adapter(tiny_bert(seed=0), "alice/tiny-orthora").eval()), logits(model)
    )
    with pytest.raises(hub.HubError, match=r"offline \(HF_HUB_OFFLINE=1\) and it is not in the local cache"):
        hub.download_adapter("alice/never-pulled")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong token", "the Hub rejected the token (401) for 'alice/tiny-orthora'"),
        ("missing repo", "Hub repo 'alice/no-such-adapter' not found"),
        ("missing revision", "revision 'v9' does not exist in Hub repo 'alice/tiny-orthora'"),
        ("network failure", "network failure while trying to download 'alice/tiny-orthora'"),
    ],
)
def test_pull_errors_are_one_line_and_leave_no_partial_file(fake_hub, case, message):
    model = adapted_model()
    model.push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)
    kwargs = {
        "wrong token": {"source": "alice/tiny-orthora", "token": "hf_wrong"},
        "missing repo": {"source": "alice/no-such-adapter"},
        "missing revision": {"source": "alice/tiny-orthora", "revision": "v9"},
        "network failure": {"source": "alice/tiny-orthora"},
    }[case]
    if case == "network failure":
        fake_hub.cut_downloads_after = 100  # the connection drops after 100 bytes of each file
    base = tiny_bert(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(hub.HubError) as error:
        hub.attach_adapter(base, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert base.state_dict().keys() == before.keys()
    for path in cache_files(fake_hub.cache):
        assert not path.name.endswith(".incomplete")
        if "blobs" in path.parts:  # every blob left is a complete copy of a file on the Hub
            assert path.read_bytes() in fake_hub.files("alice/tiny-orthora").values()


def test_a_repo_without_an_adapter_is_named(fake_hub, tmp_path):
    push_base_model(tmp_path)
    with pytest.raises(hub.HubError, match=f"Hub repo '{BASE_REPO}' has no adapter_config.json"):
        hub.attach_adapter(tiny_bert(seed=0), BASE_REPO)


def test_mismatched_base_model_fails_clearly_and_leaves_the_model_as_it_was(fake_hub):
    adapted_model().push_to_hub("alice/tiny-orthora", token=HUB_TOKEN)
    for wrong in (tiny_bert(seed=0, hidden=32), tiny_bert(seed=0, num_labels=3)):
        state = {k: v.clone() for k, v in wrong.state_dict().items()}
        modules = [(n, type(m)) for n, m in wrong.named_modules()]
        with pytest.raises(hub.HubError, match="does not fit this base model") as error:
            hub.attach_adapter(wrong, "alice/tiny-orthora")
        assert "\n" not in str(error.value) and "in the adapter but" in str(error.value)
        assert [(n, type(m)) for n, m in wrong.named_modules()] == modules
        assert all(torch.equal(state[k], v) for k, v in wrong.state_dict().items())
        assert not hasattr(wrong, "peft_config")


def test_push_errors_are_one_line(fake_hub, tmp_path):
    model = adapted_model()
    with pytest.raises(hub.HubError, match=r"rejected the token \(401\)"):
        model.push_to_hub("alice/tiny-orthora", token="hf_wrong")
    with pytest.raises(hub.HubError, match="403"):
        model.push_to_hub("bob/not-yours", token=HUB_TOKEN)
    with pytest.raises(hub.HubError, match="is not an adapter folder"):
        hub.push_adapter_folder(tmp_path, "alice/x", token=HUB_TOKEN)
    assert "alice/tiny-orthora" not in fake_hub.repos


def test_other_peft_methods_keep_peft_push(fake_hub):
    from peft import LoraConfig

    lora = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2))
    lora.push_to_hub("alice/tiny-lora", token=HUB_TOKEN)
    card = ModelCard(fake_hub.files("alice/tiny-lora")["README.md"].decode())
    assert "orthora" not in (card.data.tags or [])


def test_local_base_path_stays_off_the_card(tmp_path, fake_hub):
    model = adapted_model()
    model.peft_config["default"].base_model_name_or_path = str(tmp_path)  # a local folder
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        card = hub.build_model_card(folder, repo_id="alice/x")
        assert card.data.base_model is None and str(tmp_path) not in str(card)
        hub.push_adapter_folder(folder, "alice/x", token=HUB_TOKEN, base_model=BASE_REPO)
    pushed = fake_hub.files("alice/x")
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == BASE_REPO
    assert ModelCard(pushed["README.md"].decode()).data.base_model == BASE_REPO


def test_training_pushes_best_adapter_with_the_runs_metrics(
    fake_hub, tiny_train_models, task_files, tmp_path
):
    from orthora.train import TrainConfig, run

    train, dev = task_files("sst2", 32, 12)
    config = TrainConfig(
        task="glue",
        task_name="sst2",
        model_name_or_path=tiny_train_models["bert"],
        train_file=train,
        validation_file=dev,
        adapter={"block_size": 16, "target_modules": ["query", "value"]},
        per_device_train_batch_size=8,
        num_train_epochs=2,
        eval_before_training=True,
        eval_steps=2,
        checkpointing_steps=4,
        report_to="none",
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="alice/sst2-orthora",
        hub_strategy="checkpoint",
        hub_private_repo=True,
        hub_revision="experiment",
        hub_token=HUB_TOKEN,
    )
    results = run(config)

    repo = fake_hub.repos["alice/sst2-orthora"]
    assert repo.private and set(repo.branches) == {"main", "experiment"}
    assert fake_hub.files("alice/sst2-orthora", "main") == {}  # everything went to the branch
    messages = [repo.messages[sha] for sha in repo.commits]
    assert "orthora adapter, step 4" in messages and "orthora adapter, step 8" in messages
    files = fake_hub.files("alice/sst2-orthora", "experiment")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    best = Path(results["best_adapter_dir"])
    assert files["adapter_model.safetensors"] == (best / "adapter_model.safetensors").read_bytes()

    card = ModelCard(files["README.md"].decode())
    best_entry = next(h for h in results["history"] if h["step"] == results["best"]["step"])
    [accuracy] = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.metric_value == pytest.approx(best_entry["validation"]["accuracy"])
    assert accuracy.dataset_split == "validation" and accuracy.task_type == "text-classification"
    before = results["initial_metrics"]["validation"]["accuracy"]
    assert (
        f"| validation | accuracy | {best_entry['validation']['accuracy']:.4f} | {before:.4f} |" in card.text
    )
    card.validate()
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["hub_commit_url"].startswith(fake_hub.endpoint)
    assert (
        "hub_token" not in written["config"]
        and HUB_TOKEN not in (tmp_path / "run" / "train_config.yaml").read_text()
    )


def test_training_refuses_a_bad_hub_token_before_loading_weights(
    fake_hub, tiny_train_models, task_files, tmp_path
):
    from orthora.train import ConfigError, TrainConfig, run

    train, dev = task_files("sst2", 8, 4)
    config = TrainConfig(
        task="glue",
        task_name="sst2",
        model_name_or_path=tiny_train_models["bert"],
        train_file=train,
        validation_file=dev,
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="alice/x",
        hub_token="hf_wrong",
    )
    with pytest.raises(ConfigError, match=r"push_to_hub: the Hub rejected the token \(401\)"):
        run(config)
    assert not (tmp_path / "run").exists()
    config.hub_token = None
    with pytest.raises(ConfigError, match="needs a Hub token"):
        run(config)
