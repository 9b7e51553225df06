import json
import logging

import pytest

from memory3.services.rpc.logs import JsonFormatter, TextFormatter, configure_logging


def record(**extra):
    r = logging.LogRecord("memory3.decoder", logging.INFO, __file__, 1, "generate done in %.1fs", (0.5,), None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_lines_carry_the_request_id():
    line = json.loads(JsonFormatter().format(record(request_id="abc123")))
    assert line["message"] == "generate done in 0.5s"
    assert (line["level"], line["logger"], line["request_id"]) == ("info", "memory3.decoder", "abc123")
    assert "request_id" not in json.loads(JsonFormatter().format(record()))


def test_text_lines_carry_the_request_id():
    assert TextFormatter().format(record(request_id="abc123")).endswith("request_id=abc123")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        configure_logging("xml")
