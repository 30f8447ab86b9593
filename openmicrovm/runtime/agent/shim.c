/*
 * omv-shim: the host-side parent of one sandbox's runtime processes.
 *
 *   omv-shim [--wait] -- COMMAND [ARGS...]
 *
 * Runs COMMAND in the background under a "keeper" process and returns:
 *   --wait   with COMMAND's exit status once COMMAND exits (runsc run/restore --detach: they exit
 *            when the sandbox is up and leave the sandbox processes behind);
 *   default  with 0 as soon as COMMAND has been started (bwrap, which runs for the sandbox's life).
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

static int write_int(int fd, int value) {
    return write(fd, &value, sizeof value) == (ssize_t)sizeof value ? 0 : -1;
}

int main(int argc, char **argv) {
    int wait_for_command = 0, i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--wait")) wait_for_command = 1;
        else if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else {
            fprintf(stderr, "usage: omv-shim [--wait] -- COMMAND [ARGS...]\n");
            return 2;
        }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: omv-shim [--wait] -- COMMAND [ARGS...]\n");
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
