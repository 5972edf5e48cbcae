"""transformers' Trainer on patched models (tiny configs, local data, no network): the same losses as the unpatched
models under the same seed, dropout 0 (fp32 within 1e-5 of the loss, a few AdamW steps apart); with gradient
checkpointing; with torch.compile (one small BERT run: compiling is slow on 2 cores)."""
import pytest
import torch

import electra_fast
from test_patch_parity import batch, build

transformers = pytest.importorskip("transformers")


class _Data(torch.utils.data.Dataset):
    """Eight fixed examples of ``batch()``'s kind (padding, token types), one dict per row."""

    def __init__(self, task: str):
        rows = []
        for seed in range(3):
            inputs, labels = batch(seed)
            for i in range(inputs["input_ids"].shape[0]):
                row = {k: v[i] for k, v in inputs.items()}
                row["labels"] = labels[i] if task == "mlm" else torch.tensor((seed + i) % 3)
                rows.append(row)
        self.rows = rows[:8]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(tmp_path, family, cls_name, task, patched, **args) -> list:
    model = build(family, cls_name)
    if patched:
        electra_fast.patch(model)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run-{patched}"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, **args)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_Data(task))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    if patched:
        assert electra_fast.is_patched(trainer.model)
    return losses


def _same(got, want, rel=1e-5):
    for a, b in zip(got, want):
        assert abs(a - b) <= rel * abs(b) + 1e-6, (got, want)


@pytest.mark.parametrize("family,cls_name,task", [("bert", "BertForMaskedLM", "mlm"),
                                                  ("deberta_v2", "DebertaV2ForSequenceClassification", "cls")])
def test_trainer_losses_match_unpatched(tmp_path, family, cls_name, task):
    _same(_train(tmp_path, family, cls_name, task, True), _train(tmp_path, family, cls_name, task, False))


def test_trainer_with_gradient_checkpointing(tmp_path):
    want = _train(tmp_path, "bert", "BertForMaskedLM", "mlm", False)
    _same(_train(tmp_path, "bert", "BertForMaskedLM", "mlm", True, gradient_checkpointing=True), want)


def test_trainer_with_torch_compile(tmp_path):
    want = _train(tmp_path, "bert", "BertForMaskedLM", "mlm", False)  # eager: one compile only (slow on 2 cores)
    torch._dynamo.reset()
    _same(_train(tmp_path, "bert", "BertForMaskedLM", "mlm", True, torch_compile=True,
                 torch_compile_backend="aot_eager"), want, rel=1e-4)  # dynamo + autograd tracing, no inductor codegen
