"""A real VM per worker, reset between tests. Run: pytest examples -n 2"""

MARKER = "/etc/flightvm-example/run-id"  # written by conftest.py


def test_hostname_is_the_vm_name(flightvm):
    assert flightvm.run("hostname").stdout.strip() == flightvm.name


def test_cloud_init_finished(flightvm):
    result = flightvm.run("cloud-init status --wait", timeout=300)
    assert "status: done" in result.stdout


def test_run_marker_reached_the_guest(flightvm, flightvm_run):
    assert flightvm.run(f"cat {MARKER}").stdout.strip() == flightvm_run.run_id


def test_changes_do_not_leak_between_tests(flightvm):
    # Each test starts from the pristine snapshot: nothing the previous test did is here.
    assert flightvm.run("test -e /tmp/dirty", check=False).returncode != 0
    flightvm.run("touch /tmp/dirty")
