"""The JanusVLN agent (omnistream/navigation/janus.py) on the tiny JanusVLN-shaped checkpoint.

Oracle for the semantic branch: transformers' ``Qwen2_5_VLForConditionalGeneration`` forward over the
full prompt (system, user: every frame so far, instruction, assistant) with its own vision tower,
``get_rope_index`` positions and masks; the agent's incremental step (one frame + suffix against the
semantic memory) must give the same next-token logits while nothing is evicted. With ``lam > 0`` the
oracle gets the fused image features (its vision tower's output + lam * the spatial features from the
*non-streaming* causal VGGT forward) as precomputed encoder outputs. The decoded answer must be the one
transformers' ``generate`` gives for the same prompt. Preprocessing is checked against PIL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.checkpoints import VisionPreprocessing
from omnistream.memory.dual import MemoryConfig
from omnistream.navigation.agents import ACTIONS, Observation, parse_action
from omnistream.navigation.janus import JanusAgent, JanusError, qwen_patches, vggt_image


class _Instr:
    instruction_text = "walk past the red sofa and stop at the door on your left"


class _Episode:
    episode_id = "1"
    instruction = _Instr()


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    from omnistream.navigation.tiny import make_tiny_janus

    return make_tiny_janus(tmp_path_factory.mktemp("tiny-janus"))


def _frames(n, seed=0, shape=(48, 64, 3)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _full_prompt_logits(agent: JanusAgent, frames, lam: float):
    """transformers' forward over the whole prompt; returns the last position's logits."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = agent.model
    imgs = [vggt_image(f, agent.vggt_width) for f in frames]
    pp = [qwen_patches(im, agent.prep) for im in imgs]
    pixel_values = torch.cat([p for p, _ in pp])
    grid = torch.cat([g for _, g in pp])
    n_tok = int(grid[0].prod()) // agent.prep.merge_size**2
    ids = list(agent.prefix_ids)
    for _ in frames:
        ids += [agent.ids["vs"]] + [agent.ids["img"]] * n_tok + [agent.ids["ve"]]
    ids += agent.suffix_ids
    input_ids = torch.tensor([ids])
    mm = (input_ids == agent.ids["img"]).int()
    with torch.no_grad():
        if lam == 0:
            out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm)
        else:
            vis = model.model.visual(pixel_values, grid_thw=grid).pooler_output
            outs = agent.vggt(torch.stack(imgs)[None], causal=True)[-2][0]  # (S, P, 2C), reference path
            h, w = imgs[0].shape[1:]
            spatial = torch.cat([agent._spatial_features(o, h, w, grid[:1]) for o in outs])
            fused = vis + lam * spatial
            enc = {"image": BaseModelOutputWithPooling(pooler_output=tuple(fused.split(n_tok)))}
            out = model(input_ids=input_ids, image_grid_thw=grid, mm_token_type_ids=mm, mm_encoder_outputs=enc)
    return out.logits[0, -1]


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_incremental_step_equals_full_forward(janus_dir, lam):
    agent = JanusAgent.from_pretrained(janus_dir, lam=lam, max_new_tokens=4)
    agent.reset(_Episode())
    frames = _frames(4)
    for t in range(len(frames)):
        text = agent.step(frames[t])
        ref = _full_prompt_logits(agent, frames[: t + 1], lam)
        assert (agent.last_logits - ref).abs().max().item() <= 1e-4
    if lam == 0:  # greedy decoding (positions after the prompt) as transformers' generate does it
        imgs = [vggt_image(f, agent.vggt_width) for f in frames]
        pp = [qwen_patches(im, agent.prep) for im in imgs]
        grid = torch.cat([g for _, g in pp])
        n_tok = int(grid[0].prod()) // agent.prep.merge_size**2
        ids = agent.prefix_ids + ([agent.ids["vs"]] + [agent.ids["img"]] * n_tok + [agent.ids["ve"]]) * len(frames)
        ids = torch.tensor([ids + agent.suffix_ids])
        gen = agent.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.cat([p for p, _ in pp]),
            image_grid_thw=grid,
            mm_token_type_ids=(ids == agent.ids["img"]).int(),
            max_new_tokens=agent.max_new_tokens,
            do_sample=False,
        )[0, ids.shape[1] :].tolist()
        gen = [g for g in gen if g not in agent.eos_ids]
        assert text == agent.tokenizer.decode(gen, skip_special_tokens=True) and len(gen) > 1
    # the spatial term is really there: without it the logits differ
    if lam:
        assert (agent.last_logits - _full_prompt_logits(agent, frames, 0.0)).abs().max().item() > 1e-3


def test_reencode_baseline_equals_memory_while_history_fits(janus_dir):
    mem = JanusAgent.from_pretrained(janus_dir, max_new_tokens=3)
    base = JanusAgent.from_pretrained(janus_dir, max_new_tokens=3, reencode=8)
    for a in (mem, base):
        a.reset(_Episode())
    for f in _frames(4, seed=1):
        assert mem.step(f) == base.step(f)
        torch.testing.assert_close(mem.last_logits, base.last_logits, atol=1e-4, rtol=1e-4)


def test_actions_and_unparseable_counted(janus_dir):
    agent = JanusAgent.from_pretrained(janus_dir, max_new_tokens=4)
    agent.reset(_Episode())
    texts = []
    for t, f in enumerate(_frames(5, seed=2)):
        a = agent.act(Observation(rgb=f, step=t, position=np.zeros(3), heading=0.0))
        assert a in ACTIONS
        assert a == parse_action(agent.last_text)[0]
        texts.append(agent.last_text)
    n_bad = agent.unparseable
    assert n_bad == sum(not parse_action(t)[1] for t in texts) and n_bad >= 1  # random weights: gibberish
    # a head that always says "left" (a real Linear layer whose bias picks that token)
    tok = agent.tokenizer.encode(" left", add_special_tokens=False)
    assert len(tok) == 1
    lm_head = agent.model.lm_head
    head = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok[0]] = 10.0
    agent.model.lm_head = head
    try:
        a = agent.act(Observation(rgb=_frames(1)[0], step=5, position=np.zeros(3), heading=0.0))
    finally:
        agent.model.lm_head = lm_head
    assert a == "TURN_LEFT" and agent.unparseable == n_bad


def test_memory_bytes_constant_after_window_fills(janus_dir):
    cfg = MemoryConfig(initial_frames=2, recent_frames=3)
    agent = JanusAgent.from_pretrained(janus_dir, memory=cfg, max_new_tokens=2, vggt_width=112)
    agent.reset(_Episode())
    sizes = []
    for f in _frames(9, seed=3):
        agent.step(f)
        sizes.append(agent.memory_bytes())
    # JanusVLN's trim (after the step): frame 8 sees the 2 initial frames, the 3 before it and itself
    assert agent.memory.spatial.kept_frames() == [0, 1, 5, 6, 7, 8]
    assert agent.memory.semantic.kv.kept_frames() == [0, 1, 5, 6, 7, 8]
    assert len(set(sizes[cfg.capacity - 1 :])) == 1 and sizes[0] > 0
    # a frame of another size mid-episode is resized to the episode's frame size, not rejected
    agent.step(_frames(1, seed=4, shape=(80, 60, 3))[0])
    assert agent.memory_bytes() == sizes[-1] and agent.memory.semantic.kv.kept_frames() == [0, 1, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="RGB"):
        agent.step(np.zeros((8, 8), dtype=np.uint8))
    assert agent.memory.spatial.kept_frames() == [0, 1, 6, 7, 8, 9]  # a bad frame changes nothing
    agent.reset(_Episode())  # a new episode reuses the buffers
    agent.step(_frames(1)[0])
    assert agent.memory_bytes() == sizes[-1] and agent.memory.semantic.kv.kept_frames() == [0]


def test_checkpoint_layouts_and_errors(tmp_path, janus_dir):
    with pytest.raises(JanusError, match="config.json"):
        JanusAgent.from_pretrained(tmp_path / "missing")
    # a plain Qwen2.5-VL checkpoint without VGGT weights names what is missing
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "no-vggt"
    shutil.copytree(janus_dir, d)
    sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.startswith("vggt.")}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(JanusError, match="vggt_path"):
        JanusAgent.from_pretrained(d)
    with pytest.raises(JanusError, match="VGGT"):
        JanusAgent.from_pretrained(d, vggt_path=tmp_path / "nowhere")
    # ... and loads with the aggregator from a facebook/VGGT-1B-style file (aggregator.* + the heads)
    full = load_file(str(janus_dir / "model.safetensors"))
    vg = {k[len("vggt.") :]: v for k, v in full.items() if k.startswith("vggt.aggregator.")}
    vg["camera_head.trunk.0.weight"] = torch.zeros(2, 2)
    (tmp_path / "vggt").mkdir()
    save_file(vg, str(tmp_path / "vggt" / "model.safetensors"))
    a = JanusAgent.from_pretrained(d, vggt_path=tmp_path / "vggt", max_new_tokens=1)
    b = JanusAgent.from_pretrained(janus_dir, max_new_tokens=1)
    for x in (a, b):
        x.reset(_Episode())
        x.step(_frames(1)[0])
    torch.testing.assert_close(a.last_logits, b.last_logits, atol=0, rtol=0)


def test_vggt_preprocessing_matches_pil():
    """VGGT's load_and_preprocess_images ("crop") at JanusVLN's width 644: PIL bicubic to width 644, height
    to a multiple of 14 by VGGT's own float rule; Qwen2.5-VL gets it cropped to multiples of 28 (644x476)."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(5)
    smooth = rng.integers(0, 256, (12, 16, 3)).repeat(40, 0).repeat(40, 1).astype(np.uint8)  # 480x640
    img = vggt_image(smooth)
    h = round(480 * (644 / 640) / 14) * 14  # load_fn.py's expression: 34.50000000000001 rounds up
    assert tuple(img.shape) == (3, h, 644) == (3, 490, 644)
    ref = Image.fromarray(smooth).resize((644, h), Image.Resampling.BICUBIC)
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255.0
    diff = (img - ref).abs()
    assert diff.max().item() <= 2 / 255 + 1e-6 and diff.mean().item() < 1e-3
    patches, grid = qwen_patches(img, VisionPreprocessing())
    assert grid.tolist() == [[1, 34, 46]] and patches.shape == (34 * 46, 3 * 2 * 14 * 14)  # 476x644
    assert tuple(vggt_image(smooth, width=518).shape) == (3, 392, 518)  # VGGT's own width, as an option
    tall = vggt_image(np.zeros((1000, 200, 3), dtype=np.uint8), width=56)
    assert tuple(tall.shape) == (3, 56, 56)  # centre-cropped to a square


def _rss_bytes() -> tuple[int, int]:
    """(current, peak) resident memory of this process."""
    import resource

    with open("/proc/self/statm") as f:
        cur = int(f.read().split()[1]) * resource.getpagesize()
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_wrong_checkpoint_kind_is_refused_before_allocating(tiny_dir, tmp_path):
    """An Omni checkpoint given as a JanusVLN one: one line naming both kinds, and no default-size
    Qwen2.5-VL built on the way (that took 30 GB of fp32 and the OOM killer): memory stays flat."""
    cur0, peak0 = _rss_bytes()
    with pytest.raises(JanusError) as e:
        JanusAgent.from_pretrained(tiny_dir)
    cur1, peak1 = _rss_bytes()
    msg = str(e.value)
    assert "qwen2_5_omni" in msg and "Qwen2_5OmniForConditionalGeneration" in msg and "'qwen2_5_vl'" in msg
    assert "\n" not in msg
    assert cur1 - cur0 < 100 * 2**20 and peak1 - peak0 < 100 * 2**20
    # other kinds of wrong directory, each named
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"architectures": ["VGGT"]}')
    with pytest.raises(JanusError, match="no model_type"):
        JanusAgent.from_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.raises(JanusError, match="no \\*.safetensors"):
        JanusAgent.from_pretrained(tmp_path / "cfg")


def test_bf16_on_cpu_matches_fp32_within_tolerance(janus_dir):
    """Issue 13: the tiny agent runs in bf16 on the CPU. Tolerance: each step's next-token logits within 3% of
    their largest magnitude of fp32's (bf16 keeps 8 bits of mantissa; measured ~1%), and wherever fp32's top
    choice leads by more than twice that step's difference, bf16 picks the same first token."""
    agents = {dt: JanusAgent.from_pretrained(janus_dir, dtype=dt, max_new_tokens=3, vggt_width=112)
              for dt in ("fp32", "bf16")}
    assert agents["bf16"].dtype == torch.bfloat16 and agents["bf16"].vggt.camera_token.dtype == torch.bfloat16
    for a in agents.values():
        a.reset(_Episode())
    decided = 0
    for t, f in enumerate(_frames(4, seed=7)):
        obs = Observation(rgb=f, step=t, position=np.zeros(3), heading=0.0)
        act = {dt: a.act(obs) for dt, a in agents.items()}
        ref, low = agents["fp32"].last_logits, agents["bf16"].last_logits
        err = (ref - low).abs().max().item()
        assert err <= 0.03 * ref.abs().max().item()
        top = ref.topk(2).values
        if (top[0] - top[1]).item() > 2 * err:
            decided += 1
            assert int(low.argmax()) == int(ref.argmax())
        assert act["bf16"] in ACTIONS and act["fp32"] in ACTIONS
    assert decided >= 1  # the comparison was not vacuous


def test_janus_7b_shape_is_published_and_config_only(tmp_path):
    """`nav make-tiny --shape 7b`: Qwen2.5-VL-7B's published size (meta device, nothing allocated),
    VGGT-1B's aggregator, JanusVLN's merger; accepted by the loader's checks without weight files."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from omnistream.checkpoints import RANDOM_INIT_FILE
    from omnistream.navigation.janus import check_checkpoint
    from omnistream.navigation.tiny import QWEN25VL_7B_PARAMS, make_tiny_janus
    from omnistream.navigation.vggt import VGGTConfig

    d = make_tiny_janus(tmp_path / "janus-7b", shape="7b")
    assert not list(d.glob("*.safetensors")) and (d / RANDOM_INIT_FILE).exists()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(d))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / QWEN25VL_7B_PARAMS - 1) < 0.005, f"{total / 1e9:.3f}B parameters"
    raw = check_checkpoint(d)
    assert VGGTConfig.from_dict(raw["vggt_config"]) == VGGTConfig() and raw["vggt_merger_hidden_dim"] == 4096


def test_config_only_checkpoint_gets_random_weights_at_load(tmp_path):
    """The materialise-at-load path end to end on the tiny shape: seeded (same seed, same weights),
    every tensor on the device in the dtype, and the agent navigates."""
    from omnistream.navigation.tiny import make_tiny_janus

    d = make_tiny_janus(tmp_path / "co", config_only=True, seed=3)
    a = JanusAgent.from_pretrained(d, dtype=torch.bfloat16, max_new_tokens=2)
    b = JanusAgent.from_pretrained(d, dtype=torch.bfloat16, max_new_tokens=2)
    for m_a, m_b in ((a.model, b.model), (a.vggt, b.vggt), (a.merger, b.merger)):
        pa, pb = list(m_a.parameters()), list(m_b.parameters())
        assert pa and all(x.dtype == torch.bfloat16 and torch.equal(x, y) for x, y in zip(pa, pb))
    a.reset(_Episode())
    assert a.act(Observation(rgb=_frames(1)[0], step=0, position=np.zeros(3), heading=0.0)) in ACTIONS
