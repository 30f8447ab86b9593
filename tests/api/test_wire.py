"""The wire protocol seen from raw HTTP: routes, status codes, the AWS error form, bad input."""

from __future__ import annotations

import json
import uuid

import pytest

from openmicrovm.wire_model import service_model
from tests.conftest import image_request
from tests.support.http import raw_request
from tests.support.server import ServerProcess

IMAGES = "/2025-09-09/microvm-images"
# As every AWS SDK labels a body (a body labelled otherwise is refused: tests/api/test_cross_site.py).
JSON_HEADERS = {"Content-Type": "application/json"}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _create_body(name: str) -> str:
    return json.dumps(image_request(name))


def test_model_has_24_operations_and_each_is_routed(server: ServerProcess) -> None:
    model = service_model()
    assert len(model.operation_names) == 24
    for name in model.operation_names:
        http = model.operation_model(name).http
        path = http["requestUri"].split("?")[0]
        for label in ("imageIdentifier", "microvmIdentifier", "imageVersion", "buildId", "Resource"):
            path = path.replace("{" + label + "}", "x")
        response = raw_request(
            server.port,
            http["method"],
            path,
            "{}" if http["method"] in ("POST", "PUT", "PATCH") else None,
            JSON_HEADERS,
        )
        assert response.error_type != "UnknownOperationException", (name, response.body)
        assert response.status < 500, (name, response.status, response.body)


def test_unknown_route_is_404_unknown_operation(server: ServerProcess) -> None:
    for method, path in [
        ("GET", "/"),
        ("GET", "/2025-09-09/nothing"),
        ("POST", "/2025-09-09/microvms/x/explode"),
        ("GET", f"{IMAGES}/a/versions/1.0/builds/b/extra"),
        ("PATCH", IMAGES),
    ]:
        response = raw_request(server.port, method, path)
        assert response.status == 404, (method, path)
        assert response.error_type == "UnknownOperationException"
        assert path.split("?")[0] in response.json()["message"]
    # A known path with the wrong method names the methods it takes.
    response = raw_request(server.port, "PATCH", IMAGES)
    assert "GET" in response.json()["message"] and "POST" in response.json()["message"]


def test_create_answers_201_and_errors_use_the_aws_form(server: ServerProcess) -> None:
    name = _unique("wire")
    created = raw_request(
        server.port, "POST", IMAGES, _create_body(name), {"Content-Type": "application/json"}
    )
    assert created.status == 201
    assert created.headers["content-type"] == "application/json"
    assert created.headers["x-amzn-requestid"]
    document = created.json()
    assert document["name"] == name and document["imageVersion"] == "1.0"
    # Unset optional members are explicit nulls, as the live service sends them.
    assert "description" in document and document["description"] is None

    again = raw_request(server.port, "POST", IMAGES, _create_body(name), JSON_HEADERS)
    assert again.status == 400
    assert again.error_type == "ValidationException"
    body = again.json()
    assert set(body) == {"message"} and "already exists" in body["message"]
    assert "__type" not in body

    missing = raw_request(
        server.port, "GET", f"{IMAGES}/arn:aws:lambda:us-east-1:000000000000:microvm-image:nope"
    )
    assert missing.status == 404
    assert missing.error_type == "ResourceNotFoundException"
    # The other modeled members of the error are sent as nulls.
    assert missing.json() == {
        "message": "MicroVMImage not found for MicroVMImageID: arn:aws:lambda:us-east-1:000000000000:microvm-image:nope",
        "resourceType": None,
        "resourceId": None,
    }


def test_arns_in_the_path_may_be_raw_or_percent_encoded(server: ServerProcess) -> None:
    name = _unique("enc")
    raw_request(server.port, "POST", IMAGES, _create_body(name), JSON_HEADERS)
    arn = f"arn:aws:lambda:us-east-1:000000000000:microvm-image:{name}"
    plain = raw_request(server.port, "GET", f"{IMAGES}/{arn}")
    encoded = raw_request(server.port, "GET", f"{IMAGES}/{arn.replace(':', '%3A')}")
    assert plain.status == encoded.status == 200
    assert plain.json()["imageArn"] == encoded.json()["imageArn"] == arn


def test_tag_and_untag_answer_204_with_no_body(server: ServerProcess) -> None:
    name = _unique("tags")
    raw_request(server.port, "POST", IMAGES, _create_body(name), JSON_HEADERS)
    arn = f"arn:aws:lambda:us-east-1:000000000000:microvm-image:{name}"
    tagged = raw_request(
        server.port, "POST", f"/2017-03-31/tags/{arn}", json.dumps({"Tags": {"team": "x"}}), JSON_HEADERS
    )
    assert tagged.status == 204 and tagged.body == b""
    listed = raw_request(server.port, "GET", f"/2017-03-31/tags/{arn}")
    assert listed.json() == {"Tags": {"team": "x"}}
    untagged = raw_request(server.port, "DELETE", f"/2017-03-31/tags/{arn}?tagKeys=team&tagKeys=absent")
    assert untagged.status == 204 and untagged.body == b""
    assert raw_request(server.port, "GET", f"/2017-03-31/tags/{arn}").json() == {"Tags": {}}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_bodies_are_validation_errors(server: ServerProcess, body: str, fragment: str) -> None:
    response = raw_request(server.port, "POST", IMAGES, body.encode("latin-1"), JSON_HEADERS)
    assert response.status == 400
    assert response.error_type == "ValidationException"
    assert fragment in response.json()["message"]


def test_missing_members_are_reported_together_in_model_order(server: ServerProcess) -> None:
    response = raw_request(server.port, "POST", IMAGES, json.dumps({"name": _unique("m")}), JSON_HEADERS)
    assert response.status == 400
    assert response.json()["message"] == (
        "3 validation errors detected: "
        "Value null at 'baseImageArn' failed to satisfy constraint: Member must not be null; "
        "Value null at 'buildRoleArn' failed to satisfy constraint: Member must not be null; "
        "Value null at 'codeArtifact' failed to satisfy constraint: Member must not be null"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"name": "bad name!"},
            "Value 'bad name!' at 'name' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+",
        ),
        (
            {"name": "x" * 65},
            "at 'name' failed to satisfy constraint: Member must have length less than or equal to 64",
        ),
        (
            {"hooks": {"port": "8080"}},
            "Value '8080' at 'hooks.port' failed to satisfy constraint: Member must be an integer",
        ),
        (
            {"hooks": {"port": 70000}},
            "Value '70000' at 'hooks.port' failed to satisfy constraint: "
            "Member must have value less than or equal to 65535",
        ),
        (
            {"hooks": {"port": True}},
            "at 'hooks.port' failed to satisfy constraint: Member must be an integer",
        ),
        (
            {"resources": [{}]},
            "Value null at 'resources.1.member.minimumMemoryInMiB' failed to satisfy constraint: "
            "Member must not be null",
        ),
        (
            {"resources": [{"minimumMemoryInMiB": 512}, {"minimumMemoryInMiB": 1024}]},
            "at 'resources' failed to satisfy constraint: Member must have length less than or equal to 1",
        ),
        (
            {"cpuConfigurations": [{"architecture": "RISCV"}]},
            "Value 'RISCV' at 'cpuConfigurations.1.member.architecture' failed to satisfy constraint: "
            "Member must satisfy enum value set: [ARM_64, X86_64]",
        ),
        (
            {"codeArtifact": {}},
            "at 'codeArtifact' failed to satisfy constraint: Member must have exactly one of [uri] set",
        ),
        (
            {"logging": {"disabled": {}, "cloudWatch": {"logGroup": "g"}}},
            "at 'logging' failed to satisfy constraint: Member must have exactly one of",
        ),
        (
            {"buildRoleArn": "arn:aws:iam::12:role/x"},
            "at 'buildRoleArn' failed to satisfy constraint: Member must satisfy regular expression pattern",
        ),
        (
            {"environmentVariables": {"HAS SPACE": "v"}},
            "at 'environmentVariables' failed to satisfy constraint: "
            "Map keys must satisfy constraint: [Member must satisfy "
            "regular expression pattern: [^\\s]+]",
        ),
        (
            {"environmentVariables": {"K": "v" * 4097}},
            "Value at 'environmentVariables' failed to satisfy constraint: "
            "Map value must satisfy constraint: [Member must have length "
            "less than or equal to 4096]",
        ),
        ({"tags": {"k": "bad\u0001value"}}, "at 'tags' failed to satisfy constraint: Map value must satisfy"),
        (
            {"unknownField": 1},
            "Value at 'unknownField' failed to satisfy constraint: "
            "Member is not a member of CreateMicrovmImageRequest",
        ),
        (
            {"hooks": {"port": 1, "colour": "red"}},
            "Value at 'hooks.colour' failed to satisfy constraint: Member is not a member of Hooks",
        ),
        (
            {"egressNetworkConnectors": ["a", "b"]},
            "at 'egressNetworkConnectors' failed to satisfy constraint: "
            "Member must have length less than or equal to 1",
        ),
        ({"additionalOsCapabilities": ["SOME"]}, "Member must satisfy enum value set: [ALL]"),
    ],
)
def test_each_shape_rule_is_a_validation_error_naming_the_field(
    server: ServerProcess, change: dict, message: str
) -> None:
    request = image_request(_unique("v"))
    request.update(change)
    response = raw_request(server.port, "POST", IMAGES, json.dumps(request), JSON_HEADERS)
    assert response.status == 400, response.body
    assert response.error_type == "ValidationException"
    assert message in response.json()["message"]
    # Nothing was half-written.
    name = request["name"]
    if isinstance(name, str) and name.isascii() and len(name) <= 64 and " " not in name:
        get = raw_request(
            server.port, "GET", f"{IMAGES}/arn:aws:lambda:us-east-1:000000000000:microvm-image:{name}"
        )
        assert get.status == 404


def test_bad_query_values(server: ServerProcess) -> None:
    response = raw_request(server.port, "GET", f"{IMAGES}?maxResults=abc")
    assert response.status == 400
    assert (
        "Value 'abc' at 'maxResults' failed to satisfy constraint: Member must be an integer"
        in response.json()["message"]
    )
    response = raw_request(server.port, "GET", f"{IMAGES}?maxResults=51")
    assert response.json()["message"] == (
        "1 validation error detected: Value '51' at 'maxResults' failed to satisfy constraint: "
        "Member must have value less than or equal to 50"
    )
    response = raw_request(server.port, "GET", "/2025-09-09/microvms?maxResults=0")
    assert "Member must have value greater than or equal to 1" in response.json()["message"]


def test_path_members_may_not_be_repeated_in_the_body(server: ServerProcess) -> None:
    response = raw_request(
        server.port,
        "POST",
        "/2025-09-09/microvms/microvm-x/auth-token",
        json.dumps(
            {"microvmIdentifier": "other", "expirationInMinutes": 5, "allowedPorts": [{"port": 8080}]}
        ),
        JSON_HEADERS,
    )
    assert response.status == 400
    assert "'microvmIdentifier' belongs in the request URI" in response.json()["message"]


def test_oversized_bodies_are_413(server: ServerProcess) -> None:
    body = json.dumps({**image_request(_unique("big")), "description": "x" * (2 * 1024 * 1024)})
    response = raw_request(server.port, "POST", IMAGES, body, JSON_HEADERS)
    assert response.status == 413
    assert response.error_type == "RequestEntityTooLargeException"


def test_empty_path_label_is_a_validation_error(server: ServerProcess) -> None:
    response = raw_request(server.port, "GET", f"{IMAGES}//versions")
    assert response.status == 400
    assert (
        "at 'imageIdentifier' failed to satisfy constraint: Member must have length greater than or equal to 1"
        in (response.json()["message"])
    )


def test_server_survives_a_stream_of_garbage(server: ServerProcess) -> None:
    bodies = [
        "{",
        "null",
        "1",
        '{"name": null}',
        '{"name": {"a": 1}}',
        '{"codeArtifact": "s3://x"}',
        '{"resources": "all"}',
        '{"tags": []}',
        '{"hooks": {"microvmHooks": {"run": 1}}}',
    ]
    for body in bodies:
        response = raw_request(server.port, "POST", IMAGES, body, JSON_HEADERS)
        assert 400 <= response.status < 500, (body, response.status, response.body)
    assert raw_request(server.port, "GET", IMAGES).status == 200


def test_version_and_build_paths_validate_identifiers(server: ServerProcess) -> None:
    name = _unique("ids")
    raw_request(server.port, "POST", IMAGES, _create_body(name), JSON_HEADERS)
    arn = f"arn:aws:lambda:us-east-1:000000000000:microvm-image:{name}"
    unknown_version = raw_request(server.port, "GET", f"{IMAGES}/{arn}/versions/9.0")
    assert unknown_version.status == 404
    assert (
        unknown_version.json()["message"] == f"MicroVMImage not found for MicroVMImage: {arn}, Version: 9.0"
    )
    bad_arn = raw_request(server.port, "GET", f"{IMAGES}/{name}/versions/1.0/builds")
    assert bad_arn.status == 400 and bad_arn.json()["message"] == f"Invalid ARN format: {name}"
