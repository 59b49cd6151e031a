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
    address = args.completion_email_address
    if not address:
        return
    host = args.smtp_host or os.environ.get("HATS_MARGIN_SMTP_HOST", "localhost")
    port = args.smtp_port or int(os.environ.get("HATS_MARGIN_SMTP_PORT", "25"))
    name = args.output_artifact_name
    name = ", ".join(name) if isinstance(name, (list, tuple)) else name  # several margins from one read
    message = EmailMessage()
    status = "success" if success else "failure"
    message["Subject"] = f"hats-margin {status}: {name}"
    message["From"] = os.environ.get("HATS_MARGIN_SMTP_FROM", f"hats-margin@{socket.gethostname()}")
    message["To"] = address
    message.set_content(f"output_artifact_name: {name}\n{body}\n")
    try:
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            if os.environ.get("HATS_MARGIN_SMTP_STARTTLS", "").lower() in ("1", "true", "yes"):
                smtp.starttls()
            user, password = os.environ.get("HATS_MARGIN_SMTP_USER"), os.environ.get("HATS_MARGIN_SMTP_PASSWORD")
            if user and password:
                smtp.login(user, password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        logger.warning("could not send the completion email to %s via %s:%s: %s", address, host, port, exc)
