"""The Slurm test cluster itself, against real daemons: jobs, arrays, cancel, limits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from idds_fat.testing import SlurmCluster, wait_until

WAIT = 20.0  # generous upper bound for a job on an idle node; never a sleep


def slurm(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command against ``cluster``."""
    return subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=WAIT)


def submit(cluster: SlurmCluster, *args: str, cwd: Path) -> str:
    """``sbatch --parsable ARGS``; return the job id (fails the test on rejection)."""
    result = subprocess.run(
        ["sbatch", "--parsable", *args],
        env=cluster.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def states(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """``{"ID" or "ID_INDEX": STATE}`` of a job or every element of an array,
    finished ones included (they stay listed for MinJobAge seconds)."""
    result = slurm(cluster, "squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i %T")
    assert result.returncode == 0, result.stderr
    return dict(line.split() for line in result.stdout.splitlines())


def wait_for_states(
    cluster: SlurmCluster, job_id: str, expected: dict[str, str], timeout: float = WAIT
) -> None:
    """Wait until the job's states are exactly ``expected``."""
    seen: dict[str, str] = {}

    def reached() -> bool:
        seen.clear()
        seen.update(states(cluster, job_id))
        return seen == expected

    try:
        wait_until(reached, f"job {job_id} to reach {expected}", timeout)
    except AssertionError as error:
        raise AssertionError(f"job {job_id}: states {seen}, expected {expected}") from error


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has finished; only its parent has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_wrap_job_runs_and_writes_its_output(slurm_cluster, tmp_path):
    output = tmp_path / "hi.out"
    job = submit(slurm_cluster, "-o", str(output), "--wrap", "echo hi", cwd=tmp_path)
    wait_for_states(slurm_cluster, job, {job: "COMPLETED"})
    assert output.read_text() == "hi\n"


def test_job_runs_in_submit_dir_with_submitter_environment(slurm_cluster, tmp_path):
    env = {**slurm_cluster.env, "IDDS_FAT_PROBE": "from-submitter"}
    result = subprocess.run(
        ["sbatch", "--parsable", "-o", "probe.out", "--wrap", "pwd; id -u; echo $IDDS_FAT_PROBE"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    wait_for_states(slurm_cluster, job, {job: "COMPLETED"})
    assert (tmp_path / "probe.out").read_text().split() == [
        str(tmp_path),
        "0",
        "from-submitter",
    ]


def test_array_of_four_runs_every_element(slurm_cluster, tmp_path):
    job = submit(
        slurm_cluster,
        "--array=0-3",
        "-o",
        "elem_%a.out",
        "--wrap",
        "echo $SLURM_ARRAY_TASK_ID",
        cwd=tmp_path,
    )
    wait_for_states(slurm_cluster, job, {f"{job}_{i}": "COMPLETED" for i in range(4)})
    for i in range(4):
        assert (tmp_path / f"elem_{i}.out").read_text() == f"{i}\n"


def test_scancel_of_one_array_element_kills_it_and_spares_the_others(slurm_cluster, tmp_path):
    # Element 0 records its shell's pid and then blocks; the others finish at once.
    # scancel does not stop a job script at once: slurmstepd sends SIGCONT and
    # SIGTERM to the step's processes one by one, children first (proctrack walks
    # the process tree), so the shell may reap the killed `sleep` and run its next
    # command before its own SIGTERM lands. `set -e` makes that next command
    # unreachable: `done` is written only by an element whose work succeeded.
    script = (
        'set -e; if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then echo $$ > pid.tmp && mv pid.tmp pid; '
        "sleep 300; fi; echo done"
    )
    job = submit(slurm_cluster, "--array=0-3", "-o", "elem_%a.out", "--wrap", script, cwd=tmp_path)
    pid_file = tmp_path / "pid"
    wait_until(pid_file.exists, "array element 0 to start", WAIT)
    pid = int(pid_file.read_text())

    result = slurm(slurm_cluster, "scancel", f"{job}_0")
    assert result.returncode == 0, result.stderr

    expected = {f"{job}_0": "CANCELLED", **{f"{job}_{i}": "COMPLETED" for i in (1, 2, 3)}}
    wait_for_states(slurm_cluster, job, expected)
    wait_until(lambda: not pid_alive(pid), f"element 0's shell (pid {pid}) to die", WAIT)
    for i in (1, 2, 3):
        assert (tmp_path / f"elem_{i}.out").read_text() == "done\n"
    assert "done" not in (tmp_path / "elem_0.out").read_text()


def test_job_asking_more_cpus_than_the_node_has_is_rejected(slurm_cluster, tmp_path):
    result = subprocess.run(
        ["sbatch", "-c", str(slurm_cluster.cpus + 1), "--wrap", "true"],
        env=slurm_cluster.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode != 0
    assert "More processors requested than permitted" in result.stderr


def test_other_partition_runs_jobs_and_unknown_partition_is_rejected(slurm_cluster, tmp_path):
    assert slurm_cluster.partitions == ("debug", "other")
    job = submit(slurm_cluster, "-p", "other", "-o", "/dev/null", "--wrap", "true", cwd=tmp_path)
    wait_for_states(slurm_cluster, job, {job: "COMPLETED"})
    partition = slurm(slurm_cluster, "squeue", "-h", "-t", "all", "-j", job, "-o", "%P")
    assert partition.stdout.strip() == "other"

    rejected = slurm(slurm_cluster, "sbatch", "-p", "nosuchpartition", "--wrap", "true")
    assert rejected.returncode == 1
    assert "Invalid partition name specified" in rejected.stderr


def test_env_points_client_commands_at_the_private_conf(slurm_cluster, monkeypatch):
    monkeypatch.setenv("SQUEUE_FORMAT", "%i")  # would change what squeue prints
    env = slurm_cluster.env
    assert env["SLURM_CONF"] == str(slurm_cluster.conf_path)
    assert "SQUEUE_FORMAT" not in env
    conf = slurm_cluster.conf_path.read_text()
    assert f"SlurmctldPort={slurm_cluster.ctld_port}" in conf
    assert "MinJobAge=30" in conf


def test_stop_kills_running_jobs_and_daemons(slurm_cluster, tmp_path):
    # Its own cluster (the session one must keep running); slurm_cluster only
    # brings the availability check. Each cluster has its own munged.
    cluster = SlurmCluster(tmp_path / "own", cpus=1, memory_mb=512)
    assert cluster.ctld_port != slurm_cluster.ctld_port
    with cluster:
        job = submit(
            cluster,
            "-o",
            "/dev/null",
            "--wrap",
            "echo $$ > pid.tmp && mv pid.tmp pid; sleep 300",
            cwd=tmp_path,
        )
        wait_until((tmp_path / "pid").exists, f"job {job} to start", WAIT)
        pid = int((tmp_path / "pid").read_text())
        daemons = [
            cluster._daemons.ctld.pid,
            cluster._daemons.slurmd.pid,
            cluster._daemons.munged.pid,
        ]
        munge_dir = cluster._daemons.munged.directory
    assert not cluster.running
    wait_until(lambda: not pid_alive(pid), f"job {job}'s shell (pid {pid}) to die", timeout=5)
    assert not any(pid_alive(p) for p in daemons)
    assert not munge_dir.exists()
    # The session cluster is untouched.
    assert slurm_cluster.running
    assert slurm(slurm_cluster, "sinfo", "-h", "-o", "%T").returncode == 0
