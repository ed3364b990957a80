"""Prompt expansion, the prompt table and the `popalign prompts` subcommand (the bias axes:
tests/test_axes.py)."""

from __future__ import annotations

import json
import os

import pytest
from test_axes import GOOD_AXIS, axis_with, write_yaml

from popalign.cli import main
from popalign.commands import prompts as prompts_cmd
from popalign.data.axes import load_axes
from popalign.data.prompts import (
    DEFAULT_TEMPLATE,
    NeutralPrompt,
    PromptRow,
    expand_prompts,
    read_lines,
    read_neutral_prompts,
    read_prompt_table,
    read_specific_prompts,
    render,
    resolve_prompt_file,
    write_prompt_table,
)
from popalign.errors import UserError

# ---- expansion ------------------------------------------------------------------------------


def test_product_expansion_counts_ids_and_text():
    axes = load_axes(["gender", "race"])
    rows = expand_prompts(["a photo of a {identity} doctor", "a photo of a {identity} pilot"], axes)
    assert len(rows) == 2 * (1 + 12)  # per neutral: 1 neutral row + 2 x 6 augmented
    first = rows[0]
    assert (first.prompt_id, first.kind, first.prompt, first.classes) == (
        "p0000",
        "neutral",
        "a photo of a doctor",
        {},
    )
    # a0008 = female (1) x asian (2): 1 * 6 + 2
    assert rows[1 + 8] == PromptRow(
        "p0000-a0008",
        "p0000",
        "augmented",
        "a photo of a doctor",
        "a photo of a female asian doctor",
        {"gender": "female", "race": "asian"},
        "a photo of a {identity} doctor",
    )
    assert rows[1].prompt == "a photo of a male white doctor"
    assert rows[13].prompt_id == "p0001" and rows[25].prompt == "a photo of a female middle eastern pilot"
    # listing race first changes the enumeration order, not the phrase order (gender order 10 < race 20)
    swapped = expand_prompts(["a photo of a {identity} doctor"], list(reversed(axes)))
    assert swapped[1 + 2 * 2 + 1].prompt == "a photo of a female asian doctor"  # asian (2) x female (1)


def test_articles_agree_with_the_inserted_word():
    axes = load_axes(["race", "age"])
    rows = expand_prompts(["a photo of a {identity} engineer"], axes)
    texts = {tuple(r.classes.values()): r.prompt for r in rows}
    assert rows[0].prompt == "a photo of an engineer"
    assert texts[("asian", "old")] == "a photo of an elderly asian engineer"  # age (order 5) first
    assert texts[("white", "young")] == "a photo of a young white engineer"
    assert render("An {identity} umpire", {"identity": ""}) == "An umpire"
    assert render("an {identity} urologist", {"identity": ""}) == "a urologist"
    assert render("a {identity} engineer", {"identity": ""}, fix_articles=False) == "a engineer"
    assert (
        render("a banana and {identity} apple", {"identity": ""}) == "a banana and apple"
    )  # only slot neighbours


def test_couple_axis_fills_its_own_slot():
    rows = expand_prompts(["a photo of {couple} dancing, smiling"], load_axes(["couple"]))
    assert [r.prompt for r in rows] == [
        "a photo of a couple dancing, smiling",
        "a photo of a man and a woman dancing, smiling",
        "a photo of two men dancing, smiling",
        "a photo of two women dancing, smiling",
    ]
    with pytest.raises(UserError, match=r"\{couple\} matches no axis"):
        expand_prompts(["a photo of {couple}"], load_axes(["gender"]))


def test_csv_with_identity_placeholder(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text('prompt_id,prompt\nnurse,"a photo of an {identity}  nurse"\n,a {identity} cook\n')
    neutral = read_neutral_prompts(path)
    assert neutral == [
        NeutralPrompt("nurse", "a photo of an {identity} nurse", f"{path}:2"),
        NeutralPrompt("p0001", "a {identity} cook", f"{path}:3"),
    ]
    rows = expand_prompts(neutral, load_axes(["gender"]))
    assert [r.prompt_id for r in rows] == [
        "nurse",
        "nurse-a0000",
        "nurse-a0001",
        "p0001",
        "p0001-a0000",
        "p0001-a0001",
    ]
    assert rows[0].prompt == "a photo of a nurse" and rows[2].prompt == "a photo of a female nurse"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("prompt\na photo of a doctor\n", "has no {identity} placeholder"),
        ("text\na {identity} doctor\n", "no 'prompt' column"),
        ("prompt\n", "no prompts"),
        ('prompt\n""\n', "empty prompt"),
        ("prompt_id,prompt\nx,a {identity} cook\nx,a {identity} baker\n", "'x' repeats"),
    ],
)
def test_bad_csv(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_neutral_prompts(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_txt_with_template(tmp_path):
    path = tmp_path / "subjects.txt"
    path.write_text("# jobs\ndoctor\n\nair traffic controller  # trailing comment\n")
    neutral = read_neutral_prompts(path)
    assert [n.template for n in neutral] == [
        "a photo of a {identity} doctor",
        "a photo of a {identity} air traffic controller",
    ]
    custom = read_neutral_prompts(path, "a {identity} person working as a {subject}, at work")
    rows = expand_prompts(custom, load_axes(["gender"]))
    assert rows[3].prompt == "a person working as an air traffic controller, at work"
    assert rows[5].prompt == "a female person working as an air traffic controller, at work"
    kept = read_neutral_prompts(path, "a {identity} person working as a {subject}", fix_articles=False)
    assert kept[1].template == "a {identity} person working as a air traffic controller"
    with pytest.raises(UserError, match="no {subject} placeholder"):
        read_neutral_prompts(path, "a photo of a person")
    with pytest.raises(UserError, match="has no {identity} placeholder for axis gender"):
        expand_prompts([NeutralPrompt("p0", "a photo", "f.txt:1")], load_axes(["gender"]))


def test_expansion_and_table_are_deterministic_and_round_trip(tmp_path):
    axes = load_axes(["gender", "race"])
    neutral = read_neutral_prompts(resolve_prompt_file("occupations_eval"))
    rows = expand_prompts(neutral, axes)
    assert rows == expand_prompts(neutral, axes)
    a = write_prompt_table(rows, tmp_path / "a" / "t.jsonl")
    b = write_prompt_table(expand_prompts(neutral, axes), tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes() and read_prompt_table(a) == rows
    assert sorted(p.name for p in a.parent.iterdir()) == ["t.jsonl"]  # no temp file left behind


def test_read_prompt_table_errors(tmp_path):
    good = json.dumps(expand_prompts(["a {identity} cook"], load_axes(["gender"]))[0].to_dict())
    path = tmp_path / "t.jsonl"
    broken = json.loads(good)
    del broken["template"]
    path.write_text(good + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: missing key\(s\) template"):
        read_prompt_table(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON"):
        read_prompt_table(path)
    path.write_text(good.replace('"neutral",', '"other",', 1) + "\n")
    with pytest.raises(UserError, match="kind must be one of"):
        read_prompt_table(path)
    edited = json.loads(good) | {"prompt_id": "../p0000"}  # ids become tar keys (generate refused it unnamed)
    path.write_text(json.dumps(edited) + "\n")
    with pytest.raises(UserError, match=rf"{path}:1: prompt_id '\.\./p0000': use letters, digits"):
        read_prompt_table(path)


def test_shipped_prompt_sets():
    train = read_lines(resolve_prompt_file("occupations_train"))
    held_out = read_lines(resolve_prompt_file("occupations_eval.txt"))
    assert 40 <= len(train) <= 60 and 15 <= len(held_out) <= 20 and not set(train) & set(held_out)
    assert len(read_lines(resolve_prompt_file("generic_eval"))) >= 15
    specific = read_specific_prompts(resolve_prompt_file("specific_eval.csv"), load_axes(["gender", "race"]))
    assert specific[0] == ("a photo of a male white astronaut", {"gender": "male", "race": "white"})
    both = [tuple(c.values()) for _, c in specific if len(c) == 2]
    assert len(both) == 24 and all(both.count(c) == 2 for c in both)  # each of 12 joint classes twice
    assert all(c for _, c in specific)  # every prompt names at least one class
    couples = expand_prompts(read_neutral_prompts(resolve_prompt_file("couples")), load_axes(["couple"]))
    assert len(couples) == 8 * 4
    with pytest.raises(UserError, match="shipped sets"):
        resolve_prompt_file("no_such_set")


# ---- the subcommand -------------------------------------------------------------------------


def test_cli_writes_table(tmp_path, capsys):
    subjects = tmp_path / "jobs.txt"
    subjects.write_text("doctor\nengineer\n")
    mood = write_yaml(tmp_path, GOOD_AXIS, "mood.yaml")
    out = tmp_path / "out" / "prompts.jsonl"
    argv = ["prompts", "--prompts", str(subjects), "--axes", "gender", "race", "--axes-file", str(mood)]
    assert main([*argv, "--template", "a portrait of a {subject}", "--out", str(out)]) == 0
    rows = read_prompt_table(out)
    assert len(rows) == 2 * (1 + 2 * 6 * 2)
    # last joint class: female x middle_eastern x sad; mood has the default order 100, so it goes last
    assert rows[1 + 2 * 6 * 2 - 1].prompt == "a portrait of a female middle eastern sad doctor"
    assert rows[25].prompt == "a portrait of an engineer"
    printed = capsys.readouterr().out
    assert "2 neutral prompts x 24 augmented each" in printed and "gender[2] x race[6] x mood[2]" in printed


def test_cli_list_axes(capsys):
    assert main(["prompts", "--list-axes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["age", "couple", "gender", "race"]
    assert prompts_cmd.DEFAULT_TEMPLATE == DEFAULT_TEMPLATE


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--axes", "hair"], "unknown axis 'hair'"),
        (["--axes", "gender", "--prompts", "missing.txt"], "prompt file not found"),
        (["--axes", "gender", "--csv-prompt", "a photo of a doctor"], "has no {identity} placeholder"),
        (
            ["--axes", "gender", "--csv-prompt", "a {identity} cook", "--template", "x {subject}"],
            "template applies",
        ),
        (["--axes", "gender", "--bad-axis"], "sum to 1"),
        (["--axes", "gender", "--empty"], "no prompts"),
        ([], "no axes"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, problem):
    argv = ["prompts", "--out", str(tmp_path / "o.jsonl")]
    if "--csv-prompt" in extra:
        i = extra.index("--csv-prompt")
        csv_path = tmp_path / "p.csv"
        csv_path.write_text(f"prompt\n{extra[i + 1]}\n")
        extra = [*extra[:i], "--prompts", str(csv_path), *extra[i + 2 :]]
    if "--bad-axis" in extra:
        extra = [x for x in extra if x != "--bad-axis"]
        extra += ["--axes-file", str(write_yaml(tmp_path, axis_with(target=[0.5, 0.6])))]
    if "--empty" in extra:
        (tmp_path / "empty.txt").write_text("# nothing here\n")
        extra = [x for x in extra if x != "--empty"] + ["--prompts", str(tmp_path / "empty.txt")]
    if "--prompts" not in extra:
        (tmp_path / "jobs.txt").write_text("doctor\n")
        extra += ["--prompts", str(tmp_path / "jobs.txt")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popalign prompts: error:") and problem in err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("doctor\n")
    for out, problem in (
        (jobs, f"{jobs}: is the --prompts file itself"),  # the input would be replaced by the table
        (jobs / "t.jsonl", f"{jobs / 't.jsonl'}: {jobs} is a file, not a folder"),
    ):
        assert main(["prompts", "--prompts", str(jobs), "--axes", "gender", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("popalign prompts: error:") and problem in err, err
    assert jobs.read_text() == "doctor\n" and sorted(p.name for p in tmp_path.iterdir()) == ["jobs.txt"]


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("empty.csv", b"", "no 'prompt' column (columns: none)"),
        ("bin.txt", b"\xff\xfe doctor\n", "not UTF-8 text"),
        ("bin.csv", b"prompt\na {identity} cook\n\xff\n", "not UTF-8 text"),
        # read as one prompt holding the rest of the file, before
        ("quote.csv", b'prompt\na {identity} cook\n"a {identity} nurse\nx\n', "quote.csv:3: not valid CSV"),
        (
            "dot.csv",
            b"prompt_id,prompt\ndoc.1,a photo of a {identity} doctor\n",
            "dot.csv:2: prompt_id 'doc.1'",
        ),
        # an id equal to another prompt's augmented id: the table would hold it twice
        (
            "clash.csv",
            b"prompt_id,prompt\nx,a {identity} doctor\nx-a0000,a {identity} nurse\n",
            "clash.csv:3",
        ),
    ],
)
def test_cli_unreadable_files_and_bad_ids(tmp_path, capsys, name, data, problem):
    (tmp_path / name).write_bytes(data)
    argv = [
        "prompts",
        "--prompts",
        str(tmp_path / name),
        "--axes",
        "gender",
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and str(tmp_path / name) in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_table_mode_repeated_axes_folder_out_and_eval_sets(tmp_path, capsys):
    (tmp_path / "jobs.txt").write_text("doctor\n")
    argv = ["prompts", "--prompts", str(tmp_path / "jobs.txt")]
    umask = os.umask(0o022)
    try:
        assert main([*argv, "--axes", "gender", "--axes", "race", "--out", str(tmp_path / "t.jsonl")]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "t.jsonl").stat().st_mode & 0o777 == 0o644  # readable by others, like every output
    assert "1 neutral prompts x 12 augmented each" in capsys.readouterr().out  # both --axes, crossed
    (tmp_path / "d").mkdir()
    assert main([*argv, "--axes", "gender", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d: is a folder" in err
    assert (
        main(["prompts", "--prompts", "generic_eval", "--axes", "gender", "--out", str(tmp_path / "e.jsonl")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generic_eval.txt: an evaluation set" in err
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="bin.jsonl: not UTF-8 text"):
        read_prompt_table(tmp_path / "bin.jsonl")
