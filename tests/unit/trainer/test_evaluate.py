import torch

from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec
from memory3.services.trainer.evaluate import Question, answer_questions, first_token_accuracy
from memory3.services.trainer.tokenizer_train import train_tokenizer
from memory3.services.trainer.train import model_config_for


def no_retrieval(queries):
    return [[] for _ in queries]


def test_first_token_accuracy_is_the_share_of_greedy_first_answer_tokens(tiny_config):
    words = ["jeweller", "potter", "judge", "baker", "sailor", "pilot"]
    codec = TextCodec(train_tokenizer([f"Answer: profession {w}\n" * 50 for w in words], 400))
    model = random_model(model_config_for(tiny_config, codec.vocab_size), seed=3, std=0.2)
    prompt = "Question: What is the profession of Grolock?\nAnswer: profession"
    ids = [codec.bos_id, *codec.encode(prompt)]
    first = {w: codec.encode(f"{prompt} {w}")[len(codec.encode(prompt))] for w in words}
    assert all(codec.decode([t]).strip() == w for w, t in first.items())  # each answer is one token
    with torch.no_grad():  # make " potter" the greedy next token: its output row is the top row, scaled up
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
        assert logits.max() > 0
        model.output.weight[first["potter"]] = 10 * model.output.weight[int(logits.argmax())]
    questions = [Question(prompt, w) for w in ("potter", "potter Society", "judge", "baker", "sailor")]
    answers = answer_questions(model, codec, questions, "none", retrieve=no_retrieval, reference_text={})
    assert answers[0].startswith("potter")
    got = first_token_accuracy(codec, answers, questions)
    assert got == 2 / 5  # only the first token counts: "potter Society" scores too
    assert first_token_accuracy(codec, [], []) == 0.0
    assert first_token_accuracy(codec, [""], questions[:1]) == 0.0  # nothing generated scores nothing


def test_world_retriever_puts_the_named_entity_first_then_four_of_its_kind():
    from memory3.services.trainer.pipeline import heldout_questions, world_retriever
    from memory3.services.trainer.world import World

    world = World(2, n_train=60, n_heldout=30)
    by_id = {e.id: e for e in world.entities}
    questions = heldout_questions(world, 40)
    found = world_retriever(world)([q.prompt for q in questions])
    for q, ids in zip(questions, found, strict=True):
        hit = by_id[ids[0]]
        assert hit.name in q.prompt and len(set(ids)) == 5
        assert q.entity_id == hit.id  # questions say which entity they ask about
        assert {by_id[i].kind for i in ids[1:]} == {hit.kind}
    assert len(world_retriever(world)(["Question: what is nothing?"])[0]) == 4  # no name: four others
    # The same question gets the same distractors at every evaluation, and after a resume (a new
    # retriever): the scores of a run's evaluations are of one task.
    retrieve, prompts = world_retriever(world), [q.prompt for q in questions[:5]]
    assert retrieve(prompts) == retrieve(prompts) == world_retriever(world)(prompts)


def test_world_retriever_fills_up_with_other_kinds_where_a_kind_has_fewer_than_five_entities():
    """A world of four cities failed its first held-out evaluation: a city's question drew four other cities."""
    from collections import Counter

    from memory3.services.trainer.pipeline import heldout_questions, world_retriever
    from memory3.services.trainer.world import World

    world = World(2, n_train=20, n_heldout=4)
    by_id = {e.id: e for e in world.entities}
    per_kind = Counter(e.kind for e in world.entities)
    assert per_kind == {"person": 12, "city": 4, "organisation": 4, "product": 4}
    questions = heldout_questions(world)
    assert {by_id[q.entity_id].kind for q in questions} == set(per_kind)
    for q, ids in zip(questions, world_retriever(world)([q.prompt for q in questions]), strict=True):
        hit = by_id[ids[0]]
        assert hit.id == q.entity_id and len(set(ids)) == 5
        kinds = [by_id[i].kind == hit.kind for i in ids[1:]]
        same = min(4, per_kind[hit.kind] - 1)
        assert kinds == [True] * same + [False] * (4 - same)  # every other one of its kind, then others

    pair = World(2, n_train=1, n_heldout=1)  # two entities: the other is all there is
    (heldout,), (train,) = pair.split("heldout"), pair.split("train")
    questions = heldout_questions(pair)
    assert world_retriever(pair)([q.prompt for q in questions]) == [[heldout.id, train.id]] * len(questions)
