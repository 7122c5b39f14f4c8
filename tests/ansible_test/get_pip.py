"""Stand-in for the get-pip.py that ansible-test downloads to bootstrap pip in its venvs.

ansible-test (sanity, units) creates each virtual environment without pip and
then runs ~/.ansible/test/cache/get_pip_<version>.py, downloading it from
ci-files.testing.ansible.com when it is not cached. That host is not reachable
here (only the package registries are), so `make ansible-test-setup` caches this
file under those names instead. It does what get-pip does, from the registry:
bootstrap the interpreter's bundled pip (ensurepip), then
`pip install --upgrade --force-reinstall <the arguments ansible-test passes>`
(the pinned pip, setuptools and wheel). Runs on Python 2.7 and 3.x.
"""

import ensurepip
import os
import subprocess
import sys


def main():
    # ensurepip ignores pip's configuration by setting PIP_CONFIG_FILE=/dev/null in this
    # process's environment; the real install must see the machine's (index, certificates).
    env = dict(os.environ)
    ensurepip.bootstrap(upgrade=True)
    args = sys.argv[1:] or ["pip", "setuptools", "wheel"]
    command = [sys.executable, "-m", "pip", "install", "--upgrade", "--force-reinstall"] + args
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
