"""A TrainerService job spec becomes the same `memory3 train` (or `memory3 kb`) command line a user
would type."""

import pytest

from memory3.services.cli.main import build_parser
from memory3.services.rpc.errors import InvalidInput
from memory3.services.storage.object_store import S3Config
from memory3.services.trainer.engine import Job, KnowledgeJobSpec, TrainingJobManager, TrainingJobSpec
from memory3.services.trainer.servicer import knowledge_spec_from_proto, spec_from_proto
from memory3.v1 import trainer_service_pb2 as pb


def train_args(spec: TrainingJobSpec | KnowledgeJobSpec, tmp_path, device: str | None = None):
    s3 = S3Config(endpoint="127.0.0.1:9", access_key="k", secret_key="s")
    manager = TrainingJobManager(s3, tmp_path, python="python", device=device)
    job = Job(id="job1", spec=spec)
    if isinstance(spec, KnowledgeJobSpec):  # as submit writes them
        job.documents, job.removals = manager._write_job_files(job.id, spec)
    cmd = manager._command(job)
    assert cmd[:3] == ["python", "-m", "memory3.services.cli.main"]
    return build_parser().parse_args(cmd[3:])


def removals(args) -> tuple[list[str], list[str]]:
    """The (ids, matches) a job's command line removes, with its --from file, as `main` reads them."""
    from memory3.services.cli.main import _selection

    if args.kb_command == "remove":
        return _selection(args.ids, args.matches, args.select_from)
    return _selection(args.remove_ids, args.remove_matches, args.remove_from)


def test_a_knowledge_job_is_kb_add_on_its_documents_or_kb_remove_without(tmp_path):
    import json

    spec = knowledge_spec_from_proto(pb.KnowledgeSpec(
        release="r1-fixed", parent="r1", remove_ids=["abc"], remove_matches=["Quell"],
        documents=[pb.Document(text="A fact.\n\nWith a blank line.", source="wiki/A"), pb.Document(text="B.")]))
    spec.validate()
    args = train_args(spec, tmp_path)
    assert (args.kb_command, args.release, args.name, args.events) == ("add", "r1", "r1-fixed", True)
    assert removals(args) == (["abc"], ["Quell"])
    lines = [json.loads(line) for line in args.files[0].read_text().splitlines()]
    assert lines == [{"text": "A fact.\n\nWith a blank line.", "source": "wiki/A"},
                     {"text": "B.", "source": "document 2"}]
    assert args.index_kind is None  # the parent's
    removal = train_args(KnowledgeJobSpec(release="r2", parent="r1", remove_matches=["Quell"]), tmp_path)
    assert (removal.kb_command, *removals(removal)) == ("remove", [], ["Quell"])
    hnsw = knowledge_spec_from_proto(pb.KnowledgeSpec(release="r3", parent="r1", index_kind="hnsw",
                                                      documents=[pb.Document(text="C.")]))
    assert train_args(hnsw, tmp_path).index_kind == "hnsw"


@pytest.mark.parametrize(("spec", "message"), [
    (KnowledgeJobSpec(release="r2", parent="r1"), "give documents to add"),
    (KnowledgeJobSpec(release="r1", parent="r1", remove_ids=("a",)), "both 'r1'"),
    (KnowledgeJobSpec(release="R 2", parent="r1", remove_ids=("a",)), "release: invalid release name"),
    (KnowledgeJobSpec(release="r2", parent="r1", remove_matches=("",)), "would match every reference"),
    (KnowledgeJobSpec(release="r2", parent="r1", documents=(("s", "x" * (65 << 20)),)), "over the 67108864-byte"),
    (KnowledgeJobSpec(release="r2", parent="r1", documents=(("s", "x"),), index_kind="ivf"),
     "index_kind: unknown index kind 'ivf'; choose one of auto, flat, hnsw, ivfpq"),
    (KnowledgeJobSpec(release="r2", parent="r1", remove_ids=("a",), index_kind="flat"),
     "only removes references keeps the parent's index kind"),
    (TrainingJobSpec(release="r2", index_kind="lsh"), "index_kind: unknown index kind 'lsh'"),
])
def test_a_job_that_cannot_run_is_refused_with_what_to_fix(spec, message):
    with pytest.raises(InvalidInput, match=message):
        spec.validate()


def test_bf16_and_stage3_steps_reach_the_command(tmp_path):
    spec = spec_from_proto(pb.TrainingSpec(release="r1", preset="tiny", bf16=True, stage3_steps=0,
                                           attention_weight=0.25, index_kind="ivfpq"))
    assert (spec.bf16, spec.stage3_steps, spec.attention_weight) == (True, 0, 0.25)  # 0 is given, not the default
    args = train_args(spec, tmp_path)
    assert args.bf16 and args.stage3_steps == 0 and args.preset == "tiny" and args.release == "r1"
    assert args.attention_weight == 0.25 and args.index_kind == "ivfpq"


def test_unset_fields_keep_the_presets_defaults(tmp_path):
    spec = spec_from_proto(pb.TrainingSpec(release="r2", quick=True))
    assert (spec.preset, spec.codec, spec.bf16, spec.stage3_steps, spec.attention_weight, spec.index_kind) == \
        ("tiny", "bf16", None, None, None, "auto")  # a quick run without a preset is the one-minute tiny one
    assert spec_from_proto(pb.TrainingSpec(release="r2")).preset == "small"
    args = train_args(spec, tmp_path)
    assert args.bf16 is None and args.stage3_steps is None and args.quick and args.attention_weight is None
    assert args.index_kind == "auto"


def test_bf16_false_is_given_not_the_default(tmp_path):
    spec = spec_from_proto(pb.TrainingSpec(release="r6", bf16=False))
    assert spec.bf16 is False
    assert train_args(spec, tmp_path).bf16 is False


def test_an_attention_weight_of_zero_is_given_not_the_default(tmp_path):
    spec = spec_from_proto(pb.TrainingSpec(release="r5", attention_weight=0.0))
    assert spec.attention_weight == 0.0
    assert train_args(spec, tmp_path).attention_weight == 0.0


def test_stage3_steps_out_of_range_are_refused():
    """Past uint32, a job's progress events could not be sent: every watch of it failed."""
    for steps in (-1, 2**32 - 1):
        with pytest.raises(InvalidInput, match=f"stage3_steps is {steps}; give a number of steps from 0"):
            TrainingJobSpec(release="r3", stage3_steps=steps).validate()


def test_removals_reach_the_child_whatever_they_hold(tmp_path):
    """On its command line, a value beginning with "-" was read as an option, a NUL could not be
    passed, and 40,000 ids were more than Linux takes: the job never ran, or the worker stopped."""
    ids = tuple(f"{i:032x}" for i in range(40_000))
    matches = ("-year-old", "--help", "a\x00b", "line\nbreak", "x" * 200_000)
    for spec in (KnowledgeJobSpec(release="r2", parent="r1", remove_ids=ids, remove_matches=matches),
                 KnowledgeJobSpec(release="r2", parent="r1", remove_ids=ids, remove_matches=matches,
                                  documents=(("s", "A fact."),))):
        spec.validate()
        args = train_args(spec, tmp_path)
        assert removals(args) == (list(ids), list(matches))


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_a_negative_or_non_finite_attention_weight_is_refused(weight):
    with pytest.raises(InvalidInput, match="attention_weight is"):
        TrainingJobSpec(release="r4", attention_weight=weight).validate()


def test_a_training_spec_has_a_work_dir_of_its_own_and_the_same_spec_resumes_it(tmp_path):
    """The work dir was the release's name alone: a corrected spec for a release whose job was
    cancelled or failed was refused ("use a new --work-dir"), which a gRPC client cannot give."""
    def work_dir(**fields):
        return train_args(TrainingJobSpec(release="r1", preset="tiny", **fields), tmp_path).work_dir

    first = work_dir(seed=0)
    assert work_dir(seed=0) == first and work_dir(seed=0, bf16=True, codec="int8") == first  # resumes
    assert work_dir(seed=1) != first and first.parent == tmp_path and first.name.startswith("r1-")


def test_the_services_device_reaches_the_jobs_that_run_the_model(tmp_path):
    """`serve trainer --device cuda` trains and encodes on the GPU; left out, each job takes its own
    default (auto). Removing references runs no model, and its command takes no --device."""
    training = TrainingJobSpec(release="r1", preset="tiny")
    adding = KnowledgeJobSpec(release="r2", parent="r1", documents=(("s", "A fact."),))
    removing = KnowledgeJobSpec(release="r3", parent="r1", remove_ids=("a",))
    for spec in (training, adding):
        assert train_args(spec, tmp_path, device="cuda").device == "cuda"
        assert train_args(spec, tmp_path).device == "auto"
    assert not hasattr(train_args(removing, tmp_path, device="cuda"), "device")
