import torch
import torch.nn.functional as F

from conftest import build_tiny_model
from fedtune.client_node.data import IGNORE_INDEX, make_collate, tokenize_conversation
from fedtune.client_node.losses import sequence_losses
from fedtune.demo.data import generate_examples
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import attach_lora


def test_per_example_loss_equals_the_full_logits_reference(tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    items = [
        tokenize_conversation(e["messages"], tiny_tokenizer, max_length=200)
        for e in generate_examples("bank", 3)
    ]
    batch = make_collate(tiny_tokenizer.pad_token_id)(
        [(torch.tensor(i.input_ids), torch.tensor(i.labels)) for i in items]
    )

    with torch.no_grad():
        fast = sequence_losses(model, batch, torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = []
    for row in range(3):
        labels = batch["labels"][row, 1:]
        keep = labels != IGNORE_INDEX
        reference.append(F.cross_entropy(logits[row, :-1][keep], labels[keep]))

    assert torch.allclose(fast, torch.stack(reference), atol=1e-5)


def test_one_example_loss_does_not_depend_on_its_batch_mates(tiny_tokenizer):
    model = build_tiny_model(len(tiny_tokenizer))
    items = [
        tokenize_conversation(e["messages"], tiny_tokenizer, max_length=200)
        for e in generate_examples("hospital", 4)
    ]
    pairs = [(torch.tensor(i.input_ids), torch.tensor(i.labels)) for i in items]
    collate = make_collate(tiny_tokenizer.pad_token_id)

    with torch.no_grad():
        alone = sequence_losses(model, collate(pairs[:1]), torch.device("cpu"))
        together = sequence_losses(model, collate(pairs), torch.device("cpu"))

    assert torch.allclose(alone[0], together[0], atol=1e-5)
