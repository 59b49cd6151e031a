"""Completion email through a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import datetime
import email
import email.policy
import re
import socket
import ssl

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from hats_margin import MarginCacheArguments, StageFailedError, pipeline_with_client
from hats_margin.errors import ArgumentError, InputCatalogError

ADDRESS = "astronomer@example.org"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Inbox:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield inbox, controller.port
    finally:
        controller.stop()


@pytest.fixture(autouse=True)
def no_smtp_environment(monkeypatch):
    for name in ("HOST", "PORT", "STARTTLS", "USER", "PASSWORD", "FROM"):
        monkeypatch.delenv(f"HATS_MARGIN_SMTP_{name}", raising=False)


def make_args(input_path, output_path, **kwargs):
    return MarginCacheArguments(
        input_catalog_path=input_path, output_path=output_path, output_artifact_name="mailed_margin",
        margin_threshold=3600, progress_bar=False, completion_email_address=ADDRESS, **kwargs,
    )


def body_of(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def test_success_mail_names_artifact_rows_and_time(client, catalogs, tmp_path, smtp_server):
    inbox, port = smtp_server
    args = make_args(catalogs / "small_sky_source_catalog", tmp_path, smtp_host="127.0.0.1", smtp_port=port)
    result = pipeline_with_client(args, client)
    assert len(inbox.messages) == 1 and inbox.recipients == [[ADDRESS]]
    message = inbox.messages[0]
    assert message["Subject"] == "hats-margin success: mailed_margin"
    assert message["To"] == ADDRESS
    body = body_of(message)
    assert "mailed_margin" in body and str(result.catalog_path) in body
    assert f"rows written: {result.total_rows}" in body and result.total_rows > 0
    assert re.search(r"elapsed: \d+\.\d s", body)


def test_failure_mail_carries_the_error(client, copy_catalog, tmp_path, smtp_server):
    inbox, port = smtp_server
    broken = copy_catalog("small_sky_source_catalog")
    (broken / "dataset" / "Norder=2" / "Dir=0" / "Npix=176.parquet").write_bytes(b"not parquet")
    args = make_args(broken, tmp_path, smtp_host="127.0.0.1", smtp_port=port)
    with pytest.raises(StageFailedError):
        pipeline_with_client(args, client)
    message = inbox.messages[-1]
    assert message["Subject"] == "hats-margin failure: mailed_margin"
    body = body_of(message)
    assert "mapping task(s) failed: 2_176" in body and "Npix=176.parquet" in body
    assert re.search(r"elapsed: \d+\.\d s", body)


def test_host_and_port_from_the_environment(client, catalogs, tmp_path, smtp_server, monkeypatch):
    inbox, port = smtp_server
    monkeypatch.setenv("HATS_MARGIN_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("HATS_MARGIN_SMTP_PORT", str(port))
    monkeypatch.setenv("HATS_MARGIN_SMTP_FROM", "margins@observatory.example")
    with pytest.raises(InputCatalogError):
        pipeline_with_client(make_args(tmp_path / "missing", tmp_path / "out"), client)
    message = inbox.messages[-1]
    assert message["From"] == "margins@observatory.example"
    assert message["Subject"] == "hats-margin failure: mailed_margin"
    assert "does not exist" in body_of(message)


def test_unreachable_server_does_not_fail_the_run(client, catalogs, tmp_path, caplog):
    args = make_args(catalogs / "small_sky_object_catalog", tmp_path, smtp_host="127.0.0.1", smtp_port=free_port())
    result = pipeline_with_client(args, client)  # the margin is what matters
    assert (result.catalog_path / "hats.properties").exists()
    assert "could not send the completion email" in caplog.text


# ----------------------------------------------------------------------------- STARTTLS + login
def self_signed_context(tmp_path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_starttls_and_login_from_the_environment(client, catalogs, tmp_path, monkeypatch):
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"me", b"s3cret")
        logins.append((mechanism, ok, session.ssl is not None))
        return AuthResult(success=ok)

    inbox = Inbox()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=free_port(), tls_context=self_signed_context(tmp_path),
        require_starttls=True, authenticator=authenticator, auth_require_tls=True, auth_required=True,
    )
    controller.start()
    try:
        for name, value in {"HOST": "127.0.0.1", "PORT": str(controller.port), "STARTTLS": "1",
                            "USER": "me", "PASSWORD": "s3cret"}.items():
            monkeypatch.setenv(f"HATS_MARGIN_SMTP_{name}", value)
        pipeline_with_client(make_args(catalogs / "small_sky_object_catalog", tmp_path), client)
    finally:
        controller.stop()
    assert [ok and tls for _, ok, tls in logins] == [True]
    assert inbox.messages[0]["Subject"] == "hats-margin success: mailed_margin"


def test_cli_email_flag(capsys, client, catalogs, tmp_path, smtp_server, monkeypatch):
    from hats_margin import cli

    inbox, port = smtp_server
    monkeypatch.setenv("HATS_MARGIN_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("HATS_MARGIN_SMTP_PORT", str(port))
    code = cli.main(["build", str(catalogs / "small_sky_object_catalog"), str(tmp_path), "--threshold", "3600",
                     "--email", ADDRESS, "--scheduler", client.scheduler.address, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert inbox.messages[0]["Subject"] == "hats-margin success: small_sky_object_catalog_1deg"


# ----------------------------------------------------------------------------- mail never changes the result (issue 13 item 11)
@pytest.mark.parametrize(
    "address",
    ["me@example.org\nBcc: victim@example.org", "me@example.org\r", "a@b.org, c@d.org", "a@b.org c@d.org",
     "@example.org", "me@", "me@@example.org", "me@exa mple.org", "me@localhost\n"],
)
def test_a_bad_address_is_refused_up_front(address):
    with pytest.raises(ArgumentError, match="completion_email_address"):
        MarginCacheArguments(
            input_catalog_path="in", output_path="out", output_artifact_name="m", completion_email_address=address,
        )


@pytest.mark.parametrize("address", ["me@example.org", "first.last+margins@mail.observatory.example", "me@localhost"])
def test_plausible_addresses_are_accepted(address):
    args = MarginCacheArguments(
        input_catalog_path="in", output_path="out", output_artifact_name="m", completion_email_address=address,
    )
    assert args.completion_email_address == address


@pytest.mark.parametrize("port", ["abc", "99999", "-1", ""])
def test_a_bad_port_in_the_environment_only_warns_after_a_success(client, catalogs, tmp_path, caplog, monkeypatch, port):
    monkeypatch.setenv("HATS_MARGIN_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("HATS_MARGIN_SMTP_PORT", port)
    args = make_args(catalogs / "small_sky_object_catalog", tmp_path)
    result = pipeline_with_client(args, client)
    assert (result.catalog_path / "hats.properties").exists()
    assert "could not send the completion email" in caplog.text and "HATS_MARGIN_SMTP_PORT" in caplog.text


def test_a_failing_mail_never_replaces_the_real_error(client, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HATS_MARGIN_SMTP_PORT", "not-a-port")
    with pytest.raises(InputCatalogError, match="does not exist"):
        pipeline_with_client(make_args(tmp_path / "missing", tmp_path / "out"), client)
    assert "could not send the completion email" in caplog.text


def test_an_unexpected_error_while_mailing_only_warns(client, catalogs, tmp_path, caplog, monkeypatch):
    import smtplib

    def broken(*args, **kwargs):
        raise RuntimeError("the mail library broke")

    monkeypatch.setattr(smtplib, "SMTP", broken)
    args = make_args(catalogs / "small_sky_object_catalog", tmp_path, smtp_host="127.0.0.1", smtp_port=25)
    assert pipeline_with_client(args, client).total_rows > 0
    assert "the mail library broke" in caplog.text


def test_cli_exit_code_of_a_written_catalog_ignores_the_mail(capsys, client, catalogs, tmp_path, monkeypatch):
    from hats_margin import cli

    monkeypatch.setenv("HATS_MARGIN_SMTP_PORT", "abc")
    code = cli.main(["build", str(catalogs / "small_sky_object_catalog"), str(tmp_path), "--threshold", "3600",
                     "--email", ADDRESS, "--scheduler", client.scheduler.address, "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_one_mail_for_several_margins_names_each(client, catalogs, tmp_path, smtp_server):
    inbox, port = smtp_server
    args = make_args(catalogs / "small_sky_source_catalog", tmp_path, smtp_host="127.0.0.1", smtp_port=port)
    args = MarginCacheArguments(**{**{f: getattr(args, f) for f in (
        "input_catalog_path", "output_path", "progress_bar", "completion_email_address", "smtp_host", "smtp_port")},
        "margin_threshold": [600, 3600], "output_artifact_name": ["m600", "m3600"]})
    result = pipeline_with_client(args, client)
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert message["Subject"] == "hats-margin success: m600, m3600"
    body = body_of(message)
    for margin in result.margins:
        assert f"{margin.catalog_path}: {margin.total_rows} rows" in body and margin.total_rows > 0
