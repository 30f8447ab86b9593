/*
 * The application: starting it as the command line says, reporting it (STATUS, WAIT), and
 * reaping. As PID 1 the agent inherits every orphan in the sandbox, so reap() collects them all
 * and hands a terminal command's exit to its session.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

struct application application = {
    .ngroups = -1,
    .workdir = "/",
    .nofile = 1024,
    .state = APP_RUNNING,
    .pid = -1,
};

/* Set by the SIGCHLD handler. Under gVisor every syscall is dear: waitpid only when one came. */
volatile sig_atomic_t got_child = 1;

/* A child starts from a clean slate: no blocked signals, no handlers of the agent's. */
void reset_signals(void) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
}

/* A wait status as a shell reports it: the exit code, or 128+signal. */
int exit_code(int wait_status) {
    return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
}

/* ---------------------------------------------------------------- starting */

/* What the child could not do before exec, sent back through a close-on-exec pipe: the parent
 * reads either this or end-of-file (the exec succeeded), so STATUS can say "failed" at once. */
struct exec_failure {
    int stage; /* 1 workdir, 2 groups, 3 gid, 4 uid, 5 exec */
    int err;
};

static const char *stage_name(int stage) {
    switch (stage) {
    case 1: return "change to the working directory";
    case 2: return "set supplementary groups";
    case 3: return "set the group id";
    case 4: return "set the user id";
    default: return "execute";
    }
}

static void fail_to_start(const char *what) {
    logmsg("%s: %s", what, strerror(errno));
    application.state = APP_FAILED;
    application.status = errno;
}

__attribute__((noreturn)) static void become_app(int fail_fd) {
    struct exec_failure f = {0, 0};
    reset_signals();
    setsid();
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) {
        dup2(devnull, 0);
        if (devnull > 0) close(devnull);
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = (rlim_t)application.nofile;
        if (rl.rlim_max != RLIM_INFINITY && rl.rlim_cur > rl.rlim_max) rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (chdir(application.workdir) < 0) f = (struct exec_failure){1, errno};
    else if (application.ngroups >= 0 && setgroups((size_t)application.ngroups, application.groups) < 0 &&
             application.uid != 0)
        f = (struct exec_failure){2, errno};
    else if (setgid(application.gid) < 0) f = (struct exec_failure){3, errno};
    else if (setuid(application.uid) < 0) f = (struct exec_failure){4, errno};
    else {
        environ = application.env; /* execvp searches the application's PATH */
        execvp(application.argv[0], application.argv);
        f = (struct exec_failure){5, errno};
    }
    char msg[512];
    int n = snprintf(msg, sizeof msg, "omv-agent: cannot %s %s: %s\n", stage_name(f.stage),
                     f.stage == 1 ? application.workdir : application.argv[0], strerror(f.err));
    if (n > 0) {
        ssize_t ignored = write(2, msg, (size_t)(n < (int)sizeof msg ? n : (int)sizeof msg - 1));
        (void)ignored;
    }
    ssize_t ignored = write(fail_fd, &f, sizeof f);
    (void)ignored;
    _exit(127);
}

void start_app(void) {
    int fail_pipe[2];
    if (pipe2(fail_pipe, O_CLOEXEC) < 0) {
        fail_to_start("pipe");
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fail_to_start("fork");
        close(fail_pipe[0]);
        close(fail_pipe[1]);
        return;
    }
    if (pid == 0) become_app(fail_pipe[1]);
    close(fail_pipe[1]);
    application.pid = pid;
    struct exec_failure f;
    ssize_t n;
    do n = read(fail_pipe[0], &f, sizeof f);
    while (n < 0 && errno == EINTR);
    close(fail_pipe[0]);
    if (n == (ssize_t)sizeof f) {
        application.state = APP_FAILED;
        application.status = f.err;
    }
}

/* ---------------------------------------------------------------- STATUS, WAIT */

/* Bytes in use on "/", plus "/tmp" when that is a filesystem of its own (often a tmpfs). */
static unsigned long long disk_used(void) {
    struct statvfs root, tmp;
    struct stat st_root, st_tmp;
    unsigned long long used = 0;
    if (statvfs("/", &root) == 0) used += (unsigned long long)(root.f_blocks - root.f_bfree) * root.f_frsize;
    if (stat("/", &st_root) == 0 && stat("/tmp", &st_tmp) == 0 && st_root.st_dev != st_tmp.st_dev &&
        statvfs("/tmp", &tmp) == 0)
        used += (unsigned long long)(tmp.f_blocks - tmp.f_bfree) * tmp.f_frsize;
    return used;
}

void answer_status(struct conn *c) {
    const char *state = application.state == APP_RUNNING ? "running"
                        : application.state == APP_EXITED ? "exited"
                                                          : "failed";
    answer(c, "OK app=%s status=%d pid=%d disk=%llu\n", state, application.status, (int)application.pid,
           disk_used());
}

/* WAIT: the slot sits in WAITING, watched only for the client leaving, until record_exit. */
void start_wait(struct conn *c) {
    if (application.state != APP_RUNNING) {
        answer_status(c);
    } else if (in_state[CONN_WAITING] >= MAX_WAITERS) {
        answer(c, "ERR " ERR_BUSY " too many waiters (at most %d)\n", MAX_WAITERS);
    } else {
        free(c->buf);
        c->buf = NULL;
        set_state(c, CONN_WAITING);
        c->deadline = 0;
    }
}

/* ---------------------------------------------------------------- reaping */

static void record_exit(int wait_status) {
    if (application.state == APP_RUNNING) {
        application.state = APP_EXITED;
        application.status = exit_code(wait_status);
        logmsg("application exited with status %d", application.status);
    }
    for (int i = 0; i < n_slots; i++)
        if (conns[i].state == CONN_WAITING) answer_status(&conns[i]);
}

void reap(void) {
    int wait_status;
    pid_t pid;
    if (!got_child) return;
    got_child = 0;
    while ((pid = waitpid(-1, &wait_status, WNOHANG)) > 0) {
        if (pid == application.pid) {
            application.pid = -1;
            record_exit(wait_status);
        } else {
            pty_reaped(pid, wait_status);
        }
    }
}
