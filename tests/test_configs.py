"""The recipes: found by name from anywhere, every one loads as the CLI loads it and passes
the trainer's checks; a path to a user's own file still works; `swav-jax configs` lists
them; `--config` is in every help that takes one."""

import os

import pytest

from swav_jax import cli, configs
from swav_jax.train.validate import validate_config


def test_the_recipes_are_found():
    assert {"base", "demo", "excb_demo", "excb_400ep", "swav_800ep", "swav_200ep_bs256"} <= set(configs.names())
    assert configs.names() == sorted(configs.names())


@pytest.mark.parametrize("name", configs.names())
def test_each_recipe_loads_by_name_and_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names do not depend on the working directory
    config = cli.load_config([f"--config={name}"])
    if config.data.source == "folder":  # the one key such a recipe leaves to its user
        config.data.data_dir = str(tmp_path)
    # A plausible machine: the CPU recipes' devices, one BN group for the others.
    devices = max(1, int(config.cpu_devices), int(config.model.sync_bn_group_size))
    validate_config(config, num_devices=devices, num_processes=1)
    assert configs.describe(name)["about"], f"{name}: the first docstring line says what it reproduces"


def test_the_cpu_photo_recipe_reads_a_folder_and_reports_both_reference_levels():
    config = cli.load_config(["--config=cifar_cpu", "--config.data.data_dir=/data/photos"])
    assert (config.data.source, config.data.split, config.data.eval_split) == ("folder", "train", "test")
    assert config.eval.knn_at_end and config.eval.knn_random_init and config.eval.knn_raw_pixels


def test_name_path_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = cli.load_config(["--config=demo", "--config.batch_size=64"])
    assert by_name.batch_size == 64 and by_name.data.source == "digits"
    assert cli.load_config(["--config=demo.py"]).to_dict() == cli.load_config(["--config=demo"]).to_dict()
    # A user's own file, outside any checkout, building on a packaged recipe.
    own = tmp_path / "elsewhere" / "my_recipe.py"
    own.parent.mkdir()
    own.write_text(
        "from swav_jax.configs import demo\n\n"
        "def get_config():\n    c = demo.get_config()\n    c.epochs = 3\n    return c\n"
    )
    assert cli.load_config([f"--config={own}"]).epochs == 3
    # A file in the working directory wins over a recipe of the same name.
    (tmp_path / "demo").write_text("from swav_jax.configs import base\n\ndef get_config():\n    return base.get_config()\n")
    assert cli.load_config(["--config=demo"]).data.source == "tfds"


def test_unknown_config_is_one_line_naming_the_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"'configs/demo.py' is neither a file nor a recipe name; recipes: base, .*demo"):
        cli.load_config(["--config=configs/demo.py"])


def test_configs_command_lists_every_recipe_on_one_line(capsys):
    cli.main(["configs"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("swav-jax")}
    assert set(rows) == set(configs.names())
    assert "swav" in rows["demo"] and "2x16 + 4x8" in rows["demo"] and "random init" in rows["demo"]
    assert "75.3%" in rows["swav_800ep"] and "resnet50" in rows["swav_800ep"] and "4096" in rows["swav_800ep"]
    assert "excb" in rows["excb_400ep"] and "1024" in rows["excb_400ep"]


@pytest.mark.parametrize("command", [["train"], ["eval", "knn"], ["show-crops", "x.png"]])
def test_config_is_in_every_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    text = capsys.readouterr().out
    assert "--config NAME|FILE" in text and "--config demo" in text


def test_missing_config_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--workdir", os.devnull])
    assert "--config" in capsys.readouterr().err
