"""Run configuration: presets + overrides, validated with messages that name the key."""

import pytest
import yaml

from megasyne.training.config import ConfigError, apply_overrides, dump_config, load_config


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "recipe.yaml").write_text("seq_length: 16\n")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dict(
        run_dir="run", recipe="recipe.yaml", model="tiny_debug",
        parallel=dict(tp=2, world_size=4), optim=dict(lr=3e-4), global_batch_size=4,
    )))
    return path


def test_load_with_overrides_and_relative_paths(config_file, tmp_path):
    cfg = load_config(str(config_file), ["optim.lr=1e-5", "parallel.pp=2", "train_steps=7",
                                         "model_overrides.vocab_size=2048", "async_save=true",
                                         "fault_slow_async_write=[4]"])
    assert cfg.optim.lr == 1e-5 and cfg.parallel.tp == 2 and cfg.parallel.pp == 2
    assert cfg.train_steps == 7 and cfg.async_save and cfg.fault_slow_async_write == (4,)
    assert cfg.model_config().vocab_size == 2048
    assert cfg.run_dir == str(tmp_path / "run") and cfg.recipe == str(tmp_path / "recipe.yaml")
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["optim.betas=1"], "unknown keys in optim: \\['betas'\\]"),
    (["learning_rate=1"], "unknown config keys: \\['learning_rate'\\]"),
    (["model=llama5"], "unknown model preset 'llama5'"),
    (["dtype=fp8"], "dtype must be fp32 or bf16"),
    (["recipe=missing.yaml"], "recipe: file not found"),
    (["schedule.kind=step"], "schedule.kind must be"),
    (["eval_interval=5"], "eval_interval is set but eval_recipe is not"),
    (["model_overrides.num_query_groups=3"], "not divisible by num_query_groups"),
    (["stage_settings={s2: {peak: 1}}"], "unknown keys in stage_settings.s2: \\['peak'\\]"),
    (["stage_settings={s2: {lr: 1e-3, min_lr: 1}}"], "stage_settings.s2: need lr > 0"),
    (["adaptive={topics: [a, b], interval_steps: 5}"], "adaptive needs eval_recipe"),
    (["adaptive={topics: [a], interval_steps: 5, beta: 1}"], "unknown keys in adaptive: \\['beta'\\]"),
    (["eval_recipe=recipe.yaml", "adaptive={topics: [a, b], interval_steps: 0}"],
     "adaptive.interval_steps must be >= 1"),
    (["eval_recipe=recipe.yaml", "adaptive={topics: [a], groups: {g: {topics: [b]}}, "
      "interval_steps: 5}"], "give either topics: \\[...\\] \\(one group\\) or groups"),
    (["eval_recipe=recipe.yaml", "adaptive={groups: {zh: {topics: [a, b]}, en: {topics: [b]}}, "
      "interval_steps: 5}"], "topic 'b' is in two groups, adaptive.groups.zh and adaptive.groups.en"),
    (["eval_recipe=recipe.yaml", "adaptive={groups: {zh: {topics: [a], interval_steps: 2}}, "
      "interval_steps: 5}"], "unknown keys in adaptive.groups.zh: \\['interval_steps'\\]"),
    (["eval_recipe=recipe.yaml", "adaptive={groups: {zh: {topics: [a, b], upper: 0.4}}, "
      "interval_steps: 5}"], "adaptive.groups.zh bounds are infeasible"),
    (["model=init_checkpoint"], "model: init_checkpoint needs init_checkpoint"),
    (["data_prefetch=-1"], "data_prefetch must be an integer >= 0 \\(steps read ahead; 0 = off\\)"),
    (["data_prefetch=1.5"], "data_prefetch must be an integer >= 0"),
    (["data_prefetch=true"], "data_prefetch must be an integer >= 0"),
    (["fault_data_read_delay_s=-0.1"], "fault_data_read_delay_s must be a number of seconds >= 0"),
    (["fault_step_delay_s=x"], "fault_step_delay_s must be a number of seconds >= 0"),
    (["bench_eval={tasks: nowhere.yaml, tokenizer: ., interval_steps: 5}"],
     "bench_eval: tasks: not found"),
    (["parallel.world_size=3"], "world size 3 is not divisible by tp\\*pp\\*cp = 2\\*1\\*1"),
    (["parallel.tp=4"], "2 KV \\(query\\) groups are not divisible by tp=4"),
    (["async_save=yes please"], "async_save must be true or false, got 'yes please'"),
    (["fault_slow_async_write=[4]"], "fault_slow_async_write .* needs async_save=true"),
    (["parallel.tp=1", "parallel.pp=4", "parallel.virtual_pp=2"],
     "parallel: 4 layers cannot be split evenly into pp\\*virtual_pp = 8"),
    (["parallel.tp=1", "parallel.pp=2", "parallel.virtual_pp=2", "parallel.world_size=2",
      "global_batch_size=3"], "number of micro-batches \\(3\\) to be a multiple of pp=2"),
])
def test_bad_values_fail_with_the_key(config_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(config_file), overrides)


def test_adaptive_groups_round_trip(config_file, tmp_path):
    """The grouped form of adaptive (per-group overrides) survives config.yaml and reloads equal."""
    cfg = load_config(str(config_file), [
        "eval_recipe=recipe.yaml", "adaptive={groups: {zh_web: {topics: [zh_a, zh_b], alpha: 0.2}, "
        "en_web: {topics: [en_a, en_b, en_c]}}, interval_steps: 5, upper: 0.9}"])
    rules = cfg.adaptive.rules()
    assert list(rules) == ["zh_web", "en_web"] and rules["zh_web"].topics == ("zh_a", "zh_b")
    assert (rules["zh_web"].alpha, rules["en_web"].alpha, rules["en_web"].hi) == (0.2, 0.5, (0.9,) * 3)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


def test_world_size_is_the_launchers(config_file, monkeypatch):
    """Without parallel.world_size the layout is checked against torchrun's WORLD_SIZE, once,
    when the config is loaded (before any process group)."""
    raw = yaml.safe_load(config_file.read_text())
    del raw["parallel"]["world_size"]
    config_file.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("WORLD_SIZE", "6")
    cfg = load_config(str(config_file), ["global_batch_size=6"])
    assert (cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.dp) == (6, 2, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="world size 1 is not divisible by tp\\*pp\\*cp = 2"):
        load_config(str(config_file))


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_microbatch_arithmetic(config_file):
    cfg = load_config(str(config_file), ["global_batch_size=8", "micro_batch_size=2"])
    assert cfg.num_microbatches(dp=2) == 2
    with pytest.raises(ConfigError, match="multiple of micro_batch_size 2 x data-parallel size 3"):
        cfg.num_microbatches(dp=3)
