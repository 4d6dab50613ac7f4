"""Pytest fixtures: a real S3-compatible server on loopback, and fresh buckets.

By default a session-wide moto server (``moto.server.ThreadedMotoServer``, the
same server as ``moto_server``) is started on ``127.0.0.1`` on a free port, and
each test gets fake credentials in its environment.  Everything goes through
boto3 over real HTTP.

The same tests run against any real endpoint (AWS, MinIO, Ceph ...) when the
environment says so:

``EVRECORDER_TEST_S3_ENDPOINT``
    The endpoint URL, e.g. ``http://127.0.0.1:9000`` or
    ``https://s3.eu-west-1.amazonaws.com``.  No moto server is started.
``EVRECORDER_TEST_S3_BUCKET_PREFIX``
    Optional prefix of the bucket names the tests create (default
    ``evrecorder-test-``); each test creates one bucket and deletes it with its
    contents at the end.
Credentials and region
    From the standard AWS environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` ...);
    the identity needs to create and delete buckets.

Use from a test module by importing the fixtures, all of them, since pytest
looks fixtures up by name in the module::

    from s3server import (  # noqa: F401
        aws_credentials, bucket, s3_auth_enforced, s3_client, s3_endpoint, s3_server,
    )
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import boto3
import pytest

ENDPOINT_ENV = "EVRECORDER_TEST_S3_ENDPOINT"
BUCKET_PREFIX_ENV = "EVRECORDER_TEST_S3_BUCKET_PREFIX"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    is_moto: bool
    bucket_prefix: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The S3 endpoint for this test session: a loopback moto server, or the one configured."""
    prefix = os.environ.get(BUCKET_PREFIX_ENV) or "evrecorder-test-"
    configured = os.environ.get(ENDPOINT_ENV)
    if configured:
        yield S3Server(configured.rstrip("/"), is_moto=False, bucket_prefix=prefix)
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}", is_moto=True, bucket_prefix=prefix)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    """The endpoint URL of the test S3 server."""
    return s3_server.endpoint


@pytest.fixture
def aws_credentials(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region in the environment for moto; a real endpoint keeps its own."""
    if not s3_server.is_moto:
        return
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3_client(s3_endpoint: str, aws_credentials: None):
    """A plain boto3 client on the test server, for setting up and inspecting buckets."""
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3_server: S3Server, s3_client) -> Iterator[str]:
    """A new, empty bucket (uuid name), deleted with its contents afterwards."""
    name = (s3_server.bucket_prefix + uuid.uuid4().hex)[:63]
    region = s3_client.meta.region_name
    if region in (None, "us-east-1", "aws-global"):
        s3_client.create_bucket(Bucket=name)
    else:
        s3_client.create_bucket(
            Bucket=name, CreateBucketConfiguration={"LocationConstraint": region}
        )
    yield name
    _delete_bucket(s3_client, name)


def _delete_bucket(client, name: str) -> None:
    uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
    for upload in uploads:
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_auth_enforced(s3_server: S3Server, bucket: str) -> Iterator[None]:
    """Make the server check credentials for the rest of the test.

    A real endpoint always does.  moto accepts any credentials unless its IAM
    authentication is on: ``INITIAL_NO_AUTH_ACTION_COUNT`` (here set to 0
    through the server's ``/moto-api/reset-auth``), after which only access
    keys of IAM users known to moto are accepted.  It is switched back at the
    end.  This fixture depends on ``bucket`` so that it is torn down first:
    deleting the bucket needs moto's open mode again.
    """
    if not s3_server.is_moto:
        yield
        return
    import requests  # moto's dependency

    answer = requests.post(s3_server.endpoint + "/moto-api/reset-auth", data=b"0", timeout=10)
    answer.raise_for_status()
    previous = answer.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield
    finally:
        requests.post(
            s3_server.endpoint + "/moto-api/reset-auth", data=previous.encode(), timeout=10
        ).raise_for_status()
