"""Completion email over SMTP.

Host, port, STARTTLS and credentials come from the arguments or the environment:
``HATS_MARGIN_SMTP_HOST`` (default localhost), ``HATS_MARGIN_SMTP_PORT`` (25),
``HATS_MARGIN_SMTP_STARTTLS`` (1/true to upgrade), ``HATS_MARGIN_SMTP_USER`` and
``HATS_MARGIN_SMTP_PASSWORD`` (login when both are set), ``HATS_MARGIN_SMTP_FROM``.
A failure to send is logged, never raised: the margin itself is what matters.
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
from email.message import EmailMessage

logger = logging.getLogger(__name__)


def send_completion_email(args, *, success: bool, body: str):
    """Email the run's outcome to ``completion_email_address`` (nothing if it is empty).

    The server is ``smtp_host``/``smtp_port`` or the ``HATS_MARGIN_SMTP_*`` environment variables
    (default localhost:25; STARTTLS and login optional). A failure to send is logged as a warning,
    never raised (bad settings, server down, refused): the run's result never depends on the mail.
    """
    address = args.completion_email_address
    if not address:
        return
    host = port = None
    try:
        host = args.smtp_host or os.environ.get("HATS_MARGIN_SMTP_HOST", "localhost")
        port = args.smtp_port or _port_from_environment()
        name = args.output_artifact_name
        name = ", ".join(name) if isinstance(name, (list, tuple)) else name  # several margins from one read
        message = EmailMessage()
        status = "success" if success else "failure"
        message["Subject"] = f"hats-margin {status}: {name}"
        message["From"] = os.environ.get("HATS_MARGIN_SMTP_FROM", f"hats-margin@{socket.gethostname()}")
        message["To"] = address
        message.set_content(f"output_artifact_name: {name}\n{body}\n")
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            if os.environ.get("HATS_MARGIN_SMTP_STARTTLS", "").lower() in ("1", "true", "yes"):
                smtp.starttls()
            user, password = os.environ.get("HATS_MARGIN_SMTP_USER"), os.environ.get("HATS_MARGIN_SMTP_PASSWORD")
            if user and password:
                smtp.login(user, password)
            smtp.send_message(message)
    except Exception as exc:  # noqa: BLE001 - mail must never change the run's result or hide its error
        logger.warning("could not send the completion email to %s via %s:%s: %s", address, host, port, exc)


def _port_from_environment() -> int:
    """``HATS_MARGIN_SMTP_PORT`` as a port number (default 25); ValueError naming the variable otherwise."""
    text = os.environ.get("HATS_MARGIN_SMTP_PORT", "25")
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"HATS_MARGIN_SMTP_PORT={text!r} is not a port number 1..65535")
    return port
