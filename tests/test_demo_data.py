import json

from fedtune.demo.data import generate_examples, write_demo_data


def test_demo_data_is_deterministic_by_seed(tmp_path):
    first = write_demo_data(tmp_path / "a", domain="bank", train=50, held_out=10, seed=3)
    second = write_demo_data(tmp_path / "b", domain="bank", train=50, held_out=10, seed=3)
    other = write_demo_data(tmp_path / "c", domain="bank", train=50, held_out=10, seed=4)

    assert [p.read_text() for p in first] == [p.read_text() for p in second]
    assert first[0].read_text() != other[0].read_text()


def test_held_out_examples_do_not_repeat_training_prompts(tmp_path):
    train, held_out = write_demo_data(tmp_path, domain="hospital", train=800, held_out=100)

    def prompts(path):
        return {
            json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()
        }

    assert len(prompts(train)) == 800
    assert len(prompts(held_out)) == 100
    assert not prompts(train) & prompts(held_out)


def test_demo_data_is_varied():
    examples = generate_examples("hospital", 800)
    answers = {e["messages"][2]["content"] for e in examples}

    assert len(answers) > 100
