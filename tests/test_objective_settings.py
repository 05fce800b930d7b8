"""A new run refuses train.* settings its objective would ignore, and a beta that leaves its loss
constant; a run folder written before these rules still loads and resumes."""
import json

import pytest

from tunesmith.api import check_data_paths
from tunesmith.config import dump, load_config
from tunesmith.errors import UserError


def refusal(*overrides, tmp_path=None) -> str | None:
    cfg = load_config(None, [*overrides] + ([f"output.dir={tmp_path / 'run'}"] if tmp_path else []))
    try:
        check_data_paths(cfg)
    except UserError as err:
        return str(err)
    return None


@pytest.mark.parametrize("objective", ["dpo", "simpo", "kto"])
def test_a_beta_of_0_that_leaves_the_loss_constant_is_refused(objective, tmp_path):
    said = refusal(f"train.objective={objective}", "train.beta=0", tmp_path=tmp_path)
    assert said and "train.beta: 0" in said and f"the {objective} loss constant" in said
    assert refusal(f"train.objective={objective}", "train.beta=0.05", tmp_path=tmp_path) is None


@pytest.mark.parametrize("objective", ["orpo", "grpo"])
def test_a_beta_of_0_that_still_trains_is_kept(objective, tmp_path):
    """ORPO's loss is then its NLL term (SFT on the chosen answers), GRPO's the policy term without KL."""
    assert refusal(f"train.objective={objective}", "train.beta=0", tmp_path=tmp_path) is None


@pytest.mark.parametrize("objective, setting, readers", [
    ("orpo", "train.sft_weight=1", "dpo only"),
    ("orpo", "train.precompute_ref=true", "dpo, kto only"),
    ("dpo", "train.rewards=[my_rewards:brevity]", "grpo only"),
    ("simpo", "train.group_size=8", "grpo only"),
    ("grpo", "train.simpo_gamma=1", "simpo only"),
    ("kto", "train.label_smoothing=0.1", "dpo, simpo only"),
    ("sft", "train.beta=0.1", "dpo, orpo, kto, simpo, grpo only"),
])
def test_a_setting_the_objective_does_not_read_is_refused_by_name(objective, setting, readers, tmp_path):
    said = refusal(f"train.objective={objective}", setting, tmp_path=tmp_path)
    name = setting.partition("=")[0]
    assert said == f"{name} applies to train.objective: {readers}, not {objective}"


def test_ipo_refuses_the_label_smoothing_only_the_sigmoid_loss_reads(tmp_path):
    said = refusal("train.objective=dpo", "train.dpo_loss=ipo", "train.label_smoothing=0.1", tmp_path=tmp_path)
    assert said == "train.label_smoothing applies to train.dpo_loss: sigmoid only, not ipo"


def test_a_setting_at_its_default_passes_as_a_run_folders_config_yaml_holds_every_setting(tmp_path):
    for objective in ("sft", "dpo", "orpo", "kto", "simpo", "grpo"):
        written = tmp_path / f"{objective}.yaml"
        written.write_text(dump(load_config(None, [f"train.objective={objective}"])))
        check_data_paths(load_config(written, [f"output.dir={tmp_path / objective}"]))
    assert refusal("train.objective=orpo", "train.sft_weight=0", "train.temperature=1.0", tmp_path=tmp_path) is None


def test_every_objective_setting_says_which_objectives_read_it():
    """A new setting without its readers would never be refused where it is ignored."""
    from tunesmith.objectives.settings import READ_BY, ObjectiveSettings

    assert set(ObjectiveSettings.model_fields) - {"objective"} == set(READ_BY)


def test_a_run_folder_written_before_the_rules_still_loads_and_resumes(tmp_path):
    run = tmp_path / "run"
    old = {"train": {"objective": "orpo", "sft_weight": 1.0, "precompute_ref": True}, "output": {"dir": str(run)}}
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps(old))
    cfg = load_config(run / "config.yaml")  # as eval RUN, export and the dashboard read it
    assert cfg.train.sft_weight == 1.0
    check_data_paths(cfg)  # it goes on from its checkpoint with the settings it trained with
    with pytest.raises(UserError, match="train.sft_weight applies to"):
        check_data_paths(load_config(run / "config.yaml", ["train.resume=false"]))  # started over: a new run
    (run / "results.json").write_text("{}")
    with pytest.raises(UserError, match="train.sft_weight applies to"):
        check_data_paths(cfg)  # a finished run: only overwritten, as a new one


def test_reward_weights_of_another_length_name_both_lengths_where_given(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("train:\n  objective: grpo\n  rewards: [a:b]\n  reward_weights: [1, 2]\n")
    with pytest.raises(UserError) as refused:
        load_config(path, ["train.lr=0.001"])  # another train setting on the command line: not the culprit
    assert str(refused.value) == (f"{path}:4: train.reward_weights has 2 weights for the 1 scorer of "
                                  "train.rewards: give one weight per scorer")
    with pytest.raises(UserError) as refused:
        load_config(path, ["train.reward_weights=[1,2,3]"])
    assert str(refused.value).startswith("command line: train.reward_weights has 3 weights for the 1 scorer")
