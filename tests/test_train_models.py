"""Models (rlhf_fast.train.models): the char tokenizer, tiny Llamas, hidden states, critic and reward heads, gradient checkpointing."""

import pytest
import torch
from torch import nn

from rlhf_fast.train.models import (
    CriticModel,
    build_causal_lm,
    build_char_tokenizer,
    build_reward_model,
    lm_hidden_states,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    reward_scores,
)
from train_utils import CHARS, _batch, _lm, tokenizer


def test_char_tokenizer(tokenizer):
    ids = tokenizer("ab c")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab c"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>hi</s><|assistant|>"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 6  # role markers are single tokens


def test_build_causal_lm_is_seeded_and_leaves_global_rng(tokenizer):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = _lm(tokenizer, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the global RNG did not move
    b, c = _lm(tokenizer, seed=1), _lm(tokenizer, seed=2)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 32 and a.config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="num_heads"):
        build_causal_lm(10, hidden_size=30, num_heads=4)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_hidden_states_match_logits(tokenizer, tied):
    model = _lm(tokenizer, tie_word_embeddings=tied).eval()
    ids, mask = _batch(tokenizer, ["abc", "hello world", "z"], side="left")
    hidden, weight, bias = lm_hidden_states(model, ids, mask)
    assert hidden.shape == (3, ids.shape[1], 32) and weight.shape == (len(tokenizer), 32) and bias is None
    assert (weight is model.get_input_embeddings().weight) == tied
    logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)
    # left padding changes nothing for the real tokens: positions come from the mask, as in generate()
    r_ids, r_mask = _batch(tokenizer, ["abc"])
    r_hidden, _, _ = lm_hidden_states(model, r_ids, r_mask)
    torch.testing.assert_close(hidden[0, -4:], r_hidden[0], rtol=1e-5, atol=1e-5)


def test_lm_hidden_states_through_ddp(tokenizer, tmp_path):
    """A DDP-wrapped model runs its own forward (so gradients get synchronised): same hidden states and
    the same gradients as the plain path."""
    import torch.distributed as dist

    model = _lm(tokenizer, tie_word_embeddings=True)
    ids, mask = _batch(tokenizer, ["abc", "hello"], side="left")
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_and_grads(m, grads_of):
        h, w, _ = lm_hidden_states(m, ids, mask)
        loss = nn.functional.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), labels.flatten())
        grads_of.zero_grad()
        loss.backward()
        return h.detach(), [p.grad.clone() for p in grads_of.parameters()]

    h_plain, g_plain = loss_and_grads(model, model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        h_ddp, g_ddp = loss_and_grads(ddp, model)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(h_ddp, h_plain)
    for a, b in zip(g_ddp, g_plain):
        torch.testing.assert_close(a, b)


def test_critic_shapes_and_round_trip(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    critic = CriticModel.from_pretrained(tmp_path / "lm")  # from a causal LM: its base model, a zero head
    for name, p in critic.backbone.state_dict().items():
        assert torch.equal(p, lm.model.state_dict()[name]), name
    ids, mask = _batch(tokenizer, ["abc", "hello world"])
    values = critic(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32 and torch.all(values == 0)

    with torch.no_grad():
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(0.5)
    values = critic(ids, mask)
    assert values.std() > 0
    values.sum().backward()  # gradients reach the backbone
    assert critic.backbone.embed_tokens.weight.grad.abs().sum() > 0
    critic.save_pretrained(tmp_path / "critic")
    again = CriticModel.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(again(ids, mask), values.detach(), rtol=0, atol=0)
    from_memory = CriticModel.from_causal_lm(lm)
    assert from_memory.backbone is not lm.model and torch.equal(from_memory.backbone.norm.weight, lm.model.norm.weight)


def test_reward_model_scores(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    rm = build_reward_model(tmp_path / "lm").eval()
    assert rm.config.pad_token_id == tokenizer.pad_token_id and rm.config.num_labels == 1
    texts = ["abc", "hello world", "z"]
    right = reward_scores(rm, *_batch(tokenizer, texts, side="right"))
    left = reward_scores(rm, *_batch(tokenizer, texts, side="left"))
    assert right.shape == (3,) and right.dtype == torch.float32
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)  # padding side does not matter
    ids, mask = _batch(tokenizer, texts)
    torch.testing.assert_close(right, rm(ids, attention_mask=mask).logits.squeeze(-1), rtol=1e-5, atol=1e-5)
    single = torch.stack([reward_scores(rm, *_batch(tokenizer, [t])) for t in texts]).squeeze(-1)
    torch.testing.assert_close(single, right, rtol=1e-5, atol=1e-5)
    # pad == eos (load_tokenizer's fallback) and sequences ending in eos: the model's own pooling skips
    # the final eos, reward_scores pools at the last attended token whatever its id
    from rlhf_fast.train.data import pad_batch

    eos = tokenizer.eos_token_id
    ids, mask = pad_batch([tokenizer(t)["input_ids"] + [eos] for t in texts], eos)
    rm.config.pad_token_id = tokenizer.pad_token_id
    expected = rm(ids.masked_fill(mask == 0, tokenizer.pad_token_id), attention_mask=mask).logits.squeeze(-1)
    rm.config.pad_token_id = eos
    torch.testing.assert_close(reward_scores(rm, ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rm(ids, attention_mask=mask).logits.squeeze(-1), expected, rtol=1e-5, atol=1e-5)


def test_load_model_and_tokenizer_from_dir(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(tmp_path / "lm", dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "sdpa"
    tok = load_tokenizer(tmp_path / "lm", padding_side="left")
    assert tok.padding_side == "left" and tok("ab")["input_ids"] == tokenizer("ab")["input_ids"]
    nopad = build_char_tokenizer(CHARS)
    nopad.pad_token = None
    nopad.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(tmp_path / "nopad").pad_token == "</s>"  # falls back on eos


def test_gradient_checkpointing_recomputes_blocks(tokenizer):
    """With it on, each decoder block's MLP runs twice per training step (forward, then again in the backward);
    the critic's backbone too."""
    from rlhf_fast.train.models import enable_gradient_checkpointing

    for make in (lambda: _lm(tokenizer, num_layers=2), lambda: CriticModel.from_causal_lm(_lm(tokenizer, num_layers=2))):
        counts = {}
        for flag in (False, True):
            model = enable_gradient_checkpointing(make(), flag).train()
            layer = (model.backbone if isinstance(model, CriticModel) else model.model).layers[0]
            calls = []
            layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the checkpointed region
            ids, mask = _batch(tokenizer, ["abc", "de"])
            out = model(ids, mask) if isinstance(model, CriticModel) else model(input_ids=ids, attention_mask=mask).logits
            out.float().sum().backward()
            counts[flag] = len(calls)
        assert counts == {False: 1, True: 2}
