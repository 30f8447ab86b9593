/*
 * omv-shim: the host-side parent of one sandbox's runtime processes.
 *
 *   omv-shim [--wait] [--join CGROUP_PROCS]... -- COMMAND [ARGS...]
 *
 * Runs COMMAND in the background under a "keeper" process and returns:
 *   --wait   with COMMAND's exit status once COMMAND exits (runsc run/restore --detach: they exit
 *            when the sandbox is up and leave the sandbox processes behind);
 *   default  with 0 as soon as COMMAND has been started (bwrap, which runs for the sandbox's life).
 * --join: the keeper first moves itself into each of these cgroup.procs files (the sandbox's
 * cgroups), and COMMAND starts there with it; a failure exits 125 before COMMAND runs. The keeper
 * belongs with the sandbox, not with the server that started it: otherwise it stays in the
 * server's cgroup (a systemd unit's) after the server stops, where systemd counts it as a left-over
 * process of the unit, and `systemctl kill` of the server would end it.
 *
 * The keeper is a child subreaper in its own session: the sandbox processes COMMAND leaves behind
 * are re-parented to it instead of to the host's init, it reaps them the moment they exit, and it
 * exits when none is left. Why: the server must not be their parent (they outlive a server
 * restart, and an asyncio child watcher would hold a thread per child), and PID 1 on some hosts
 * reaps orphans only now and then; `runsc delete` waits about a second for every zombie sandbox.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* One cgroup.procs file per cgroup v1 hierarchy at most, or the one of cgroup v2. */
#define MAX_JOINS 16

static int write_int(int fd, int value) {
    return write(fd, &value, sizeof value) == (ssize_t)sizeof value ? 0 : -1;
}

static int join_cgroup(const char *procs_file) {
    int fd = open(procs_file, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char pid[32];
    int length = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    int result = write(fd, pid, length) == length ? 0 : -1;
    int saved = errno;
    close(fd);
    errno = saved;
    return result;
}

static void usage(void) {
    fprintf(stderr, "usage: omv-shim [--wait] [--join CGROUP_PROCS]... -- COMMAND [ARGS...]\n");
}

int main(int argc, char **argv) {
    int wait_for_command = 0, i = 1, joins = 0;
    const char *join[MAX_JOINS];
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--wait")) wait_for_command = 1;
        else if (!strcmp(argv[i], "--join") && i + 1 < argc && joins < MAX_JOINS) join[joins++] = argv[++i];
        else if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else {
            usage();
            return 2;
        }
    }
    if (i >= argc) {
        usage();
        return 2;
    }
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0) {
        perror("omv-shim: pipe");
        return 126;
    }
    pid_t keeper = fork();
    if (keeper < 0) {
        perror("omv-shim: fork");
        return 126;
    }
    if (keeper > 0) {
        /* The caller's child: wait for the keeper's report, then exit with it. */
        close(report[1]);
        int status = 126;
        ssize_t n;
        do n = read(report[0], &status, sizeof status);
        while (n < 0 && errno == EINTR);
        if (n != (ssize_t)sizeof status) status = 126;
        int ignored;
        waitpid(keeper, &ignored, WNOHANG);
        return status;
    }

    close(report[0]);
    setsid();
    for (int j = 0; j < joins; j++) {
        if (join_cgroup(join[j]) < 0) {
            fprintf(stderr, "omv-shim: cannot join the cgroup %s: %s\n", join[j], strerror(errno));
            write_int(report[1], 125);
            return 125;
        }
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    signal(SIGHUP, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    pid_t command = fork();
    if (command < 0) {
        write_int(report[1], 126);
        return 126;
    }
    if (command == 0) {
        signal(SIGHUP, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        execvp(argv[i], &argv[i]);
        fprintf(stderr, "omv-shim: cannot execute %s: %s\n", argv[i], strerror(errno));
        _exit(127);
    }
    /* Never the victim when the sandbox's cgroup runs out of memory: without the keeper its
     * processes would go to init. Set after the fork, since children inherit the value. */
    int adjust = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (adjust >= 0) {
        if (write(adjust, "-1000", 5) != 5) { /* best effort: an unprivileged caller may not */ }
        close(adjust);
    }
    int reported = 0;
    if (!wait_for_command) {
        write_int(report[1], 0);
        close(report[1]);
        reported = 1;
    }
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: nothing left to look after */
        }
        if (pid == command && !reported) {
            write_int(report[1], WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            close(report[1]);
            reported = 1;
        }
    }
    return 0;
}
