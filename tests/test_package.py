import subprocess
import sys

import kernels
import peers
import swarm
import transport
from transport.errors import FatalError, RetryableError, SwarmError


def test_packages_import_without_side_effects():
    for module in (kernels, transport, swarm, peers):
        assert module.__doc__


def test_error_tree_marks_retryability():
    assert issubclass(transport.DeadlineExceeded, RetryableError)
    assert issubclass(transport.MalformedMessage, FatalError)
    assert transport.ServerBusy.retryable and not transport.MessageTooLarge.retryable
    assert issubclass(transport.ConfigurationError, ValueError)
    for cls in (RetryableError, FatalError):
        assert issubclass(cls, SwarmError)


def test_cli_version():
    out = subprocess.run(
        [sys.executable, "-m", "peers.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("swarm ")
