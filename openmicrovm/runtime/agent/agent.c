/*
 * omv-agent: the init process (PID 1) of every openmicrovm sandbox.
 *
 * It starts the application, reaps zombies, forwards SIGTERM/SIGINT to the application and serves
 * a small control protocol on one TCP address inside the sandbox, so that the host can reach
 * services the application binds to 127.0.0.1 (inside gVisor that loopback is gVisor's own
 * netstack, which no host socket can reach), ask whether the application is alive, and run
 * commands on a pseudo-terminal.
 *
 * Usage:
 *   omv-agent --listen ADDR:PORT [--uid N] [--gid N] [--groups G1,G2] [--workdir DIR]
 *             [--nofile N] [--max-relays N] -- ARGV...
 * The application gets the agent's environment minus OMV_AGENT_* variables. The shared secret is
 * taken from $OMV_AGENT_TOKEN and wiped from memory, so an application that runs as another user
 * cannot read it from /proc/1/environ and drive the agent.
 *
 * One process serves everything: every connection, relay and terminal session is a slot of one
 * poll() loop, never a process of its own. Under gVisor's ptrace platform every guest process is a
 * host process with a host thread per sentry thread that ran it, all counted by the sandbox's pids
 * cgroup: an agent that forked per connection let a flood of connections fill that cgroup until
 * gVisor itself could not create a thread and died. At most --max-relays (DEFAULT_MAX_RELAYS)
 * CONNECT relays run at once; one more is refused with EMAXCONN, which the host reports as "too
 * many connections" (HTTP 429 at the endpoint). Terminal sessions (MAX_PTYS) and WAIT watchers
 * (MAX_WAITERS) have limits of their own (EBUSY), and at most MAX_PENDING connections may be
 * sending their request line or reading their answer; more wait in the listen backlog.
 *
 * Protocol (version 1). One request per TCP connection. The client sends one line (at most
 * MAX_LINE bytes, newline-terminated; partial reads are reassembled):
 *
 *     OMV1 <token> <VERB> [key=value ...]\n
 *
 * Values are percent-encoded (%XX) so they may contain spaces, '=' or any byte but NUL.
 * The agent answers with one line, "OK [key=value ...]\n" or "ERR <CODE> <message>\n".
 *
 *   STATUS                    -> OK app=running|exited|failed status=N pid=N disk=BYTES
 *                                status: exit code, 128+signal, or errno when exec failed.
 *                                disk: bytes used on "/" (plus "/tmp" when it is another fs).
 *   WAIT                      -> the STATUS answer, sent once the application is no longer
 *                                running (at once if it is not); the connection stays open
 *                                until then. ERR EBUSY when MAX_WAITERS are waiting already.
 *   ABORT                     -> OK aborted=N
 *                                Resets every relayed connection, PTY session (its command is
 *                                killed) and waiting WAIT (see below).
 *   CONNECT port=N            -> OK, then relay; or ERR ECONNREFUSED ... when nothing listens
 *                                on 127.0.0.1:N inside the sandbox (ETIMEDOUT when the connection
 *                                is not accepted within CONNECT_TIMEOUT_MS), or ERR EMAXCONN when
 *                                the relay limit is reached.
 *   PTY rows=R cols=C arg=A... [env=K=V...] [cwd=DIR] [uid=N] [gid=N]
 *                             -> OK pid=N, then PTY frames; or ERR ... (EBUSY: too many sessions)
 *
 * After OK, bytes from the agent to the client are framed: 1 type byte, a 4-byte big-endian
 * length, the payload. Types sent by the agent: 'd' data, 'e' end of data (CONNECT: the
 * application closed its side), 'x' exit (PTY: payload is the exit status in decimal,
 * 128+signal for a signal). For CONNECT the client sends raw bytes and half-closes (FIN) when it
 * has nothing more to send. For PTY the client sends frames too: 'd' terminal input, 'r' resize
 * (payload "ROWS COLS" in decimal), 'k' signal to the session (payload: signal number).
 *
 * Who closes first matters: the client always closes a connection first; the agent closes only
 * after reading the client's EOF. gVisor (2022) refuses to checkpoint while any TCP endpoint on
 * the sandbox's network interface is in a connected state, and a socket that closes first goes
 * to TIME_WAIT for 60 s, which gVisor does not let a RST cut short. So the agent signals "end of
 * data" with an 'e' frame instead of a FIN and leaves TIME_WAIT to the host. Every accepted
 * socket carries SO_LINGER {1, 0}, so a connection the agent has to drop (ABORT, a protocol
 * error) ends in a RST, which leaves no state behind. A one-line answer (STATUS, ABORT, ERR ...)
 * ends the same way once the client has read it and closed its side. A relay or PTY session ends
 * gracefully (linger off) so queued data is still delivered; its socket then spends one round
 * trip in LAST_ACK, which the host covers by retrying a checkpoint that finds a connection still
 * open. The host sends ABORT before every checkpoint.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 65536
#define MAX_PENDING 64          /* connections sending their request or reading a one-line answer */
#define DEFAULT_MAX_RELAYS 128  /* CONNECT relays at once (--max-relays) */
#define MAX_RELAYS_LIMIT 4096
#define MAX_PTYS 16             /* terminal sessions at once, including ones being hung up */
#define MAX_WAITERS 8           /* WAIT connections at once */
#define MAX_ARGS 1024
#define BUF_SIZE 65536
#define REQUEST_TIMEOUT_MS 10000
#define DRAIN_TIMEOUT_MS 10000
#define CONNECT_TIMEOUT_MS 8000 /* below the host's REPLY_TIMEOUT, so that it hears why */
#define HANGUP_GRACE_MS 1000    /* a hung-up terminal command gets this long before SIGKILL */

extern char **environ;

static const char *listen_spec;
static char *token;
static size_t token_len;
static uid_t app_uid;
static gid_t app_gid;
static gid_t app_groups[64];
static int app_ngroups = -1; /* -1: keep the groups unchanged */
static const char *app_workdir = "/";
static long app_nofile = 1024;
static long max_relays = DEFAULT_MAX_RELAYS;
static char **app_argv;
static char **app_env;

enum app_state { APP_RUNNING, APP_EXITED, APP_FAILED };
static enum app_state app_state = APP_RUNNING;
static int app_status; /* exit code, 128+signal, or errno when exec failed */
static pid_t app_pid = -1;

static int self_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_term;
static volatile sig_atomic_t got_child = 1; /* a SIGCHLD since the last reap (under gVisor every
                                              syscall is dear: waitpid only when one came) */
static int terminating;

static void logmsg(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    /* stderr is the sandbox log; a failed write has nowhere else to go. */
    ssize_t ignored = write(2, "omv-agent: ", 11);
    ignored = write(2, line, n);
    (void)ignored;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_nonblock(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

static void set_linger(int fd, int on) {
    struct linger lg = {on, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Close a client socket after the client's EOF: linger off, so queued bytes still go out. */
static void close_graceful(int fd) {
    set_linger(fd, 0);
    close(fd);
}

/* Write everything, waiting on a non-blocking socket; gives up after timeout_ms of no progress. */
static int write_all(int fd, const void *data, size_t len, int timeout_ms) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {fd, POLLOUT, 0};
            int r = poll(&pfd, 1, timeout_ms);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}
static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decode in place; returns -1 on a malformed escape or an embedded NUL. */
static int pct_decode(char *s) {
    char *out = s;
    for (char *in = s; *in; in++) {
        if (*in == '%') {
            int hi = hexval(in[1]), lo = hi < 0 ? -1 : hexval(in[2]);
            if (hi < 0 || lo < 0) return -1;
            int c = hi * 16 + lo;
            if (c == 0) return -1;
            *out++ = (char)c;
            in += 2;
        } else {
            *out++ = *in;
        }
    }
    *out = 0;
    return 0;
}

static int parse_long(const char *s, long min, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) return -1;
    *out = v;
    return 0;
}

static int token_ok(const char *given) {
    size_t n = strlen(given);
    unsigned char diff = (unsigned char)(n != token_len);
    for (size_t i = 0; i < token_len; i++) diff |= (unsigned char)(token[i] ^ (i < n ? given[i] : 0));
    return diff == 0;
}

static void reset_signals(void) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
}

static void on_signal(int sig) {
    int saved = errno;
    if (sig == SIGTERM || sig == SIGINT) got_term = sig;
    if (sig == SIGCHLD) got_child = 1;
    char b = (char)sig;
    ssize_t ignored = write(self_pipe[1], &b, 1);
    (void)ignored;
    errno = saved;
}

/* ---------------------------------------------------------------- application */

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

static void start_app(void) {
    int fail_pipe[2];
    if (pipe2(fail_pipe, O_CLOEXEC) < 0) {
        logmsg("pipe: %s", strerror(errno));
        app_state = APP_FAILED;
        app_status = errno;
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        logmsg("fork: %s", strerror(errno));
        app_state = APP_FAILED;
        app_status = errno;
        close(fail_pipe[0]);
        close(fail_pipe[1]);
        return;
    }
    if (pid == 0) {
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
            rl.rlim_cur = (rlim_t)app_nofile;
            if (rl.rlim_max != RLIM_INFINITY && rl.rlim_cur > rl.rlim_max) rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (chdir(app_workdir) < 0) f = (struct exec_failure){1, errno};
        else if (app_ngroups >= 0 && setgroups((size_t)app_ngroups, app_groups) < 0 && app_uid != 0)
            f = (struct exec_failure){2, errno};
        else if (setgid(app_gid) < 0) f = (struct exec_failure){3, errno};
        else if (setuid(app_uid) < 0) f = (struct exec_failure){4, errno};
        else {
            environ = app_env; /* execvp searches the application's PATH */
            execvp(app_argv[0], app_argv);
            f = (struct exec_failure){5, errno};
        }
        char msg[512];
        int n = snprintf(msg, sizeof msg, "omv-agent: cannot %s %s: %s\n", stage_name(f.stage),
                         f.stage == 1 ? app_workdir : app_argv[0], strerror(f.err));
        if (n > 0) {
            ssize_t ignored = write(2, msg, (size_t)(n < (int)sizeof msg ? n : (int)sizeof msg - 1));
            (void)ignored;
        }
        ssize_t ignored = write(fail_pipe[1], &f, sizeof f);
        (void)ignored;
        _exit(127);
    }
    close(fail_pipe[1]);
    app_pid = pid;
    struct exec_failure f;
    ssize_t n;
    do n = read(fail_pipe[0], &f, sizeof f);
    while (n < 0 && errno == EINTR);
    close(fail_pipe[0]);
    if (n == (ssize_t)sizeof f) {
        app_state = APP_FAILED;
        app_status = f.err;
    }
}
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

/* ---------------------------------------------------------------- framed output */

struct outbuf {
    char *data;
    size_t len, cap;
};

static int out_reserve(struct outbuf *o, size_t extra) {
    if (o->len + extra <= o->cap) return 0;
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + extra) cap *= 2;
    char *d = realloc(o->data, cap);
    if (!d) return -1;
    o->data = d;
    o->cap = cap;
    return 0;
}

static int out_frame(struct outbuf *o, char type, const void *payload, size_t len) {
    if (out_reserve(o, len + 5) < 0) return -1;
    char *p = o->data + o->len;
    p[0] = type;
    uint32_t be = htonl((uint32_t)len);
    memcpy(p + 1, &be, 4);
    if (len) memcpy(p + 5, payload, len);
    o->len += len + 5;
    return 0;
}

/* Send what the socket takes now; -1 on a hard error. */
static int out_flush(struct outbuf *o, int fd) {
    while (o->len > 0) {
        ssize_t n = write(fd, o->data, o->len);
        if (n > 0) {
            memmove(o->data, o->data + n, o->len - (size_t)n);
            o->len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- CONNECT */

static void errno_name(int err, char *out, size_t size) {
    const char *name;
    switch (err) {
    case ECONNREFUSED: name = "ECONNREFUSED"; break;
    case ETIMEDOUT: name = "ETIMEDOUT"; break;
    case ENETUNREACH: name = "ENETUNREACH"; break;
    case EADDRNOTAVAIL: name = "EADDRNOTAVAIL"; break;
    case EMFILE: name = "EMFILE"; break;
    default: snprintf(out, size, "E%d", err); return;
    }
    snprintf(out, size, "%s", name);
}

/* ---------------------------------------------------------------- PTY */

struct pty_request {
    long rows, cols, uid, gid;
    const char *cwd;
    char *argv[MAX_ARGS + 1];
    int argc;
    char *env[MAX_ARGS + 1];
    int envc;
};

static void pty_child(struct pty_request *req) {
    reset_signals();
    if (req->cwd && chdir(req->cwd) < 0) {
        fprintf(stderr, "cannot change to %s: %s\r\n", req->cwd, strerror(errno));
        _exit(127);
    }
    if (req->uid >= 0) {
        gid_t gid = req->gid >= 0 ? (gid_t)req->gid : (gid_t)req->uid;
        if (setgroups(0, NULL) < 0 && req->uid != 0) {
            fprintf(stderr, "cannot drop groups: %s\r\n", strerror(errno));
            _exit(127);
        }
        if (setgid(gid) < 0 || setuid((uid_t)req->uid) < 0) {
            fprintf(stderr, "cannot switch to uid %ld: %s\r\n", req->uid, strerror(errno));
            _exit(127);
        }
    }
    environ = req->env;
    execvp(req->argv[0], req->argv);
    fprintf(stderr, "cannot execute %s: %s\r\n", req->argv[0], strerror(errno));
    _exit(127);
}

static int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

/* Apply every complete frame in `in`; a partial frame stays for the next read. -1: protocol error. */
static int pty_decode(char *in, size_t *in_len, char *to_master, size_t *to_master_len, int master, pid_t child,
                      int exited) {
    size_t off = 0;
    while (*in_len - off >= 5) {
        uint32_t be;
        memcpy(&be, in + off + 1, 4);
        size_t len = ntohl(be);
        if (len > BUF_SIZE) return -1;
        if (*in_len - off < 5 + len) break;
        char type = in[off];
        char *payload = in + off + 5;
        if (type == 'd') {
            if (*to_master_len + len > BUF_SIZE) break; /* wait until the terminal took more */
            if (master >= 0) {
                memcpy(to_master + *to_master_len, payload, len);
                *to_master_len += len;
            }
        } else if (type == 'r' && len < 32) {
            char tmp[32];
            memcpy(tmp, payload, len);
            tmp[len] = 0;
            unsigned rows, cols;
            if (sscanf(tmp, "%u %u", &rows, &cols) == 2 && master >= 0 && rows < 65536 && cols < 65536) {
                struct winsize w = {(unsigned short)rows, (unsigned short)cols, 0, 0};
                ioctl(master, TIOCSWINSZ, &w);
            }
        } else if (type == 'k' && len < 16) {
            char tmp[16];
            memcpy(tmp, payload, len);
            tmp[len] = 0;
            long sig;
            if (parse_long(tmp, 1, 64, &sig) == 0 && !exited) kill(-child, (int)sig);
        } else {
            return -1;
        }
        off += 5 + len;
    }
    memmove(in, in + off, *in_len - off);
    *in_len -= off;
    return 0;
}

/* ---------------------------------------------------------------- connections */

/*
 * Every accepted connection is one slot, whatever it turns into:
 *   READING     sending its request line (deadline: REQUEST_TIMEOUT_MS)
 *   DRAINING    answered with one line; waiting for the client to close (DRAIN_TIMEOUT_MS)
 *   WAITING     WAIT: answered when the application stops
 *   CONNECTING  CONNECT: the connection to the application is being made (CONNECT_TIMEOUT_MS)
 *   RELAY       CONNECT: bytes flow both ways
 *   PTY         a terminal session
 *   HANGUP      a terminal session whose client left: its command got SIGHUP and, unless it
 *               exits first, gets SIGKILL after HANGUP_GRACE_MS (no sockets left)
 */
enum conn_state { CONN_FREE, CONN_READING, CONN_DRAINING, CONN_WAITING, CONN_CONNECTING, CONN_RELAY, CONN_PTY,
                  CONN_HANGUP, CONN_STATES };

struct conn {
    enum conn_state state;
    int fd; /* the client socket */
    long long deadline; /* 0: none */
    short crev, orev;   /* poll results of this round: client socket, other descriptor */
    /* READING */
    char *buf;
    size_t len;
    /* CONNECTING, RELAY */
    int app;
    long port;
    char *to_app;
    size_t to_app_len, to_app_cap;
    int client_eof, app_eof, app_dead, app_wr_closed;
    /* RELAY, PTY */
    struct outbuf to_client; /* framed */
    /* PTY */
    int master;
    pid_t child;
    int exited, exit_sent, status;
    char *in;
    size_t in_len;
    char *to_master;
    size_t to_master_len;
};

static struct conn *conns;
static int n_slots;
static int in_state[CONN_STATES];
static char io_buf[BUF_SIZE];

static void set_state(struct conn *c, enum conn_state state) {
    in_state[c->state]--;
    in_state[state]++;
    c->state = state;
}

static int pending_count(void) { return in_state[CONN_READING] + in_state[CONN_DRAINING]; }
static int relay_count(void) { return in_state[CONN_CONNECTING] + in_state[CONN_RELAY]; }
static int pty_count(void) { return in_state[CONN_PTY] + in_state[CONN_HANGUP]; }

/* Release a slot. graceful: the client's EOF was read (linger off); else the client gets a RST. */
static void free_conn(struct conn *c, int graceful) {
    if (c->fd >= 0) {
        if (graceful) close_graceful(c->fd);
        else close(c->fd);
    }
    if (c->app >= 0) close(c->app);
    if (c->master >= 0) close(c->master);
    free(c->buf);
    free(c->to_app);
    free(c->to_client.data);
    free(c->in);
    free(c->to_master);
    in_state[c->state]--;
    in_state[CONN_FREE]++;
    *c = (struct conn){.state = CONN_FREE, .fd = -1, .app = -1, .master = -1};
}

static void drain(struct conn *c) {
    free(c->buf);
    c->buf = NULL;
    set_state(c, CONN_DRAINING);
    c->deadline = now_ms() + DRAIN_TIMEOUT_MS;
}

/* Answer with one line and wait for the client to close. */
static void answer(struct conn *c, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line) n = sizeof line - 1;
    if (n > 0) write_all(c->fd, line, (size_t)n, 2000);
    drain(c);
}

static void answer_status(struct conn *c) {
    const char *state = app_state == APP_RUNNING ? "running" : app_state == APP_EXITED ? "exited" : "failed";
    answer(c, "OK app=%s status=%d pid=%d disk=%llu\n", state, app_status, (int)app_pid, disk_used());
}

/* A terminal session's command: SIGKILL to its process group (and to itself, should it have left it). */
static void kill_session(pid_t child, int sig) {
    if (child > 0) {
        kill(-child, sig);
        kill(child, sig);
    }
}

/* ---------------------------------------------------------------- application exits */

static void record_exit(int status) {
    if (app_state == APP_RUNNING) {
        app_state = APP_EXITED;
        app_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        logmsg("application exited with status %d", app_status);
    }
    for (int i = 0; i < n_slots; i++)
        if (conns[i].state == CONN_WAITING) answer_status(&conns[i]);
}

static void reap(void) {
    int status;
    pid_t pid;
    if (!got_child) return;
    got_child = 0;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == app_pid) {
            app_pid = -1;
            record_exit(status);
            continue;
        }
        for (int i = 0; i < n_slots; i++) {
            struct conn *c = &conns[i];
            if (c->child != pid || (c->state != CONN_PTY && c->state != CONN_HANGUP)) continue;
            if (c->state == CONN_HANGUP) {
                free_conn(c, 0);
            } else {
                c->exited = 1;
                c->status = exit_code(status);
                c->child = -1;
            }
            break;
        }
    }
}

/* ---------------------------------------------------------------- CONNECT */

static void relay_reset(struct conn *c) { free_conn(c, 0); }

static void connect_failed(struct conn *c, int err) {
    char name[32];
    errno_name(err, name, sizeof name);
    close(c->app);
    c->app = -1;
    free(c->to_app);
    c->to_app = NULL;
    c->to_app_len = c->to_app_cap = 0;
    set_state(c, CONN_READING); /* counted as pending again while the answer is read */
    answer(c, "ERR %s %s on 127.0.0.1:%ld\n", name, strerror(err), c->port);
}

static void connected(struct conn *c) {
    int one = 1;
    setsockopt(c->app, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->deadline = 0;
    set_state(c, CONN_RELAY);
    /* A fresh socket takes three bytes without waiting. */
    write_all(c->fd, "OK\n", 3, 2000);
}

/* CONNECT port=N: early holds the bytes the client sent after its request line. */
static void start_connect(struct conn *c, long port, const char *early, size_t early_len) {
    if (relay_count() >= max_relays) {
        answer(c, "ERR EMAXCONN too many connections: %ld are being relayed, the most this sandbox takes\n",
               max_relays);
        return;
    }
    size_t cap = early_len > BUF_SIZE ? early_len : BUF_SIZE;
    char *to_app = malloc(cap);
    if (!to_app) {
        answer(c, "ERR ENOMEM out of memory\n");
        return;
    }
    memcpy(to_app, early, early_len);
    free(c->buf);
    c->buf = NULL;
    c->to_app = to_app;
    c->to_app_len = early_len;
    c->to_app_cap = cap;
    c->port = port;
    set_state(c, CONN_CONNECTING);
    c->deadline = now_ms() + CONNECT_TIMEOUT_MS;
    c->app = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->app < 0) {
        connect_failed(c, errno);
        return;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->app, (struct sockaddr *)&sa, sizeof sa) == 0) connected(c);
    else if (errno != EINPROGRESS && errno != EINTR) connect_failed(c, errno);
}

static void connecting_step(struct conn *c) {
    if (c->crev & (POLLERR | POLLHUP)) {
        relay_reset(c); /* the client gave up */
        return;
    }
    if (!(c->orev & (POLLOUT | POLLERR | POLLHUP))) return;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->app, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == 0) connected(c);
    else connect_failed(c, err);
}

/*
 * Relay between the client socket (raw in, framed out) and the application's socket.
 * Ends when the client has closed (its EOF read) and the application's end has been delivered.
 */
static void relay_step(struct conn *c) {
    short cr = c->crev, ar = c->orev;
    if (cr & (POLLIN | POLLHUP | POLLERR)) {
        if (!c->client_eof && c->to_app_len < c->to_app_cap) {
            ssize_t n = read(c->fd, c->to_app + c->to_app_len, c->to_app_cap - c->to_app_len);
            if (n > 0) {
                if (c->app_dead) c->to_app_len = 0; /* the application is gone: discard */
                else c->to_app_len += (size_t)n;
            } else if (n == 0) {
                c->client_eof = 1;
            } else if (errno != EINTR && errno != EAGAIN) {
                relay_reset(c);
                return;
            }
        } else if (cr & (POLLERR | POLLHUP)) {
            relay_reset(c); /* the client is gone */
            return;
        }
    }
    if ((cr & POLLOUT) && out_flush(&c->to_client, c->fd) < 0) {
        relay_reset(c);
        return;
    }
    if ((ar & (POLLIN | POLLHUP | POLLERR)) && !c->app_eof && !c->app_dead) {
        ssize_t n = read(c->app, io_buf, sizeof io_buf);
        if (n > 0) {
            if (out_frame(&c->to_client, 'd', io_buf, (size_t)n) < 0) {
                relay_reset(c);
                return;
            }
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
            c->app_eof = 1;
            if (out_frame(&c->to_client, 'e', NULL, 0) < 0) {
                relay_reset(c);
                return;
            }
        }
        if (out_flush(&c->to_client, c->fd) < 0) {
            relay_reset(c);
            return;
        }
    }
    if ((ar & (POLLOUT | POLLHUP | POLLERR)) && c->to_app_len && !c->app_dead) {
        ssize_t n = write(c->app, c->to_app, c->to_app_len);
        if (n > 0) {
            memmove(c->to_app, c->to_app + n, c->to_app_len - (size_t)n);
            c->to_app_len -= (size_t)n;
        } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
            c->app_dead = 1;
            c->to_app_len = 0;
            if (!c->app_eof) {
                c->app_eof = 1;
                if (out_frame(&c->to_client, 'e', NULL, 0) < 0) {
                    relay_reset(c);
                    return;
                }
            }
        }
    }
    if (c->client_eof && c->to_app_len == 0 && !c->app_wr_closed && !c->app_dead) {
        shutdown(c->app, SHUT_WR);
        c->app_wr_closed = 1;
    }
    if (c->to_client.len == 0 && c->to_client.cap > 4 * BUF_SIZE && !(ar & POLLIN)) {
        free(c->to_client.data); /* a burst is over: give its memory back */
        c->to_client = (struct outbuf){0};
    }
    if (c->client_eof && (c->app_eof || c->app_dead) && c->to_client.len == 0) free_conn(c, 1);
}

/* ---------------------------------------------------------------- PTY */

static void start_pty(struct conn *c, struct pty_request *req, const char *early, size_t early_len) {
    if (pty_count() >= MAX_PTYS) {
        answer(c, "ERR EBUSY too many terminal sessions (at most %d)\n", MAX_PTYS);
        return;
    }
    const size_t in_cap = BUF_SIZE + 5;
    if (early_len > in_cap) {
        free_conn(c, 0);
        return;
    }
    char *in = malloc(in_cap), *to_master = malloc(BUF_SIZE);
    if (!in || !to_master) {
        free(in);
        free(to_master);
        answer(c, "ERR ENOMEM out of memory\n");
        return;
    }
    int master;
    struct winsize ws = {(unsigned short)req->rows, (unsigned short)req->cols, 0, 0};
    pid_t child = forkpty(&master, NULL, NULL, &ws);
    if (child < 0) {
        int err = errno;
        free(in);
        free(to_master);
        answer(c, "ERR EPTY cannot open a pseudo-terminal: %s\n", strerror(err));
        return;
    }
    if (child == 0) pty_child(req); /* every descriptor of ours is close-on-exec */
    fcntl(master, F_SETFD, FD_CLOEXEC);
    set_nonblock(master, 1);
    memcpy(in, early, early_len);
    free(c->buf);
    c->buf = NULL;
    c->in = in;
    c->in_len = early_len;
    c->to_master = to_master;
    c->master = master;
    c->child = child;
    c->deadline = 0;
    set_state(c, CONN_PTY);
    char line[64];
    int n = snprintf(line, sizeof line, "OK pid=%d\n", (int)child);
    write_all(c->fd, line, (size_t)n, 2000);
}

static void pty_reset(struct conn *c) {
    if (!c->exited) kill_session(c->child, SIGKILL);
    free_conn(c, 0);
}

static void pty_step(struct conn *c) {
    const size_t in_cap = BUF_SIZE + 5;
    short cr = c->crev, mr = c->orev;
    if (cr & (POLLIN | POLLHUP | POLLERR)) {
        if (!c->client_eof && c->in_len < in_cap) {
            ssize_t n = read(c->fd, c->in + c->in_len, in_cap - c->in_len);
            if (n == 0) c->client_eof = 1;
            else if (n > 0) c->in_len += (size_t)n;
            else if (errno != EINTR && errno != EAGAIN) {
                pty_reset(c);
                return;
            }
        } else if (cr & (POLLERR | POLLHUP)) {
            pty_reset(c);
            return;
        }
    }
    if ((cr & POLLOUT) && out_flush(&c->to_client, c->fd) < 0) {
        pty_reset(c);
        return;
    }
    if (c->master >= 0 && (mr & (POLLOUT | POLLERR | POLLHUP)) && c->to_master_len) {
        ssize_t n = write(c->master, c->to_master, c->to_master_len);
        if (n > 0) {
            memmove(c->to_master, c->to_master + n, c->to_master_len - (size_t)n);
            c->to_master_len -= (size_t)n;
        } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
            c->to_master_len = 0; /* nobody reads the terminal any more */
        }
    }
    if (c->master >= 0 && (mr & (POLLIN | POLLHUP | POLLERR))) {
        ssize_t n = read(c->master, io_buf, sizeof io_buf);
        if (n > 0) {
            if (out_frame(&c->to_client, 'd', io_buf, (size_t)n) < 0 || out_flush(&c->to_client, c->fd) < 0) {
                pty_reset(c);
                return;
            }
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
            /* EIO: every holder of the terminal closed it; the exit status follows (reap). */
            close(c->master);
            c->master = -1;
        }
    }
    if (pty_decode(c->in, &c->in_len, c->to_master, &c->to_master_len, c->master, c->child, c->exited) < 0) {
        pty_reset(c);
        return;
    }
    if (c->exited && !c->exit_sent) {
        /* Pass on what the command printed last, then report the exit. */
        while (c->master >= 0) {
            ssize_t n = read(c->master, io_buf, sizeof io_buf);
            if (n <= 0) break;
            if (out_frame(&c->to_client, 'd', io_buf, (size_t)n) < 0) {
                pty_reset(c);
                return;
            }
        }
        if (c->master >= 0) close(c->master);
        c->master = -1;
        char code[16];
        int n = snprintf(code, sizeof code, "%d", c->status);
        if (out_frame(&c->to_client, 'x', code, (size_t)n) < 0 || out_flush(&c->to_client, c->fd) < 0) {
            pty_reset(c);
            return;
        }
        c->exit_sent = 1;
    }
    if (!c->client_eof) return;
    if (c->exited) {
        free_conn(c, 1);
        return;
    }
    /* The client went away before the command ended: hang up the session. */
    kill_session(c->child, SIGHUP);
    close_graceful(c->fd);
    c->fd = -1;
    if (c->master >= 0) close(c->master);
    c->master = -1;
    set_state(c, CONN_HANGUP);
    c->deadline = now_ms() + HANGUP_GRACE_MS;
}

/* ---------------------------------------------------------------- requests */

static void abort_all(struct conn *except, int *count) {
    *count = 0;
    for (int i = 0; i < n_slots; i++) {
        struct conn *c = &conns[i];
        if (c->state == CONN_FREE || c == except) continue;
        if ((c->state == CONN_PTY && !c->exited) || c->state == CONN_HANGUP) kill_session(c->child, SIGKILL);
        free_conn(c, 0);
        (*count)++;
    }
}

static void handle_request(struct conn *c, char *line, const char *early, size_t early_len) {
    char *words[MAX_ARGS * 2 + 8];
    int n = 0;
    for (char *save = NULL, *w = strtok_r(line, " \r", &save); w && n < (int)(sizeof words / sizeof *words);
         w = strtok_r(NULL, " \r", &save))
        words[n++] = w;
    if (n < 3 || strcmp(words[0], "OMV1") != 0) {
        answer(c, "ERR EPROTO expected: OMV1 <token> <verb> [key=value ...]\n");
        return;
    }
    if (!token_ok(words[1])) {
        answer(c, "ERR EACCES bad token\n");
        return;
    }
    const char *verb = words[2];
    struct pty_request req = {.rows = 24, .cols = 80, .uid = -1, .gid = -1};
    long port = -1;
    for (int i = 3; i < n; i++) {
        char *eq = strchr(words[i], '=');
        if (!eq) goto bad;
        *eq = 0;
        char *key = words[i], *value = eq + 1;
        if (pct_decode(value) < 0) goto bad;
        long v;
        if (!strcmp(key, "port") && parse_long(value, 1, 65535, &v) == 0) port = v;
        else if (!strcmp(key, "rows") && parse_long(value, 1, 10000, &v) == 0) req.rows = v;
        else if (!strcmp(key, "cols") && parse_long(value, 1, 10000, &v) == 0) req.cols = v;
        else if (!strcmp(key, "uid") && parse_long(value, 0, 0x7fffffff, &v) == 0) req.uid = v;
        else if (!strcmp(key, "gid") && parse_long(value, 0, 0x7fffffff, &v) == 0) req.gid = v;
        else if (!strcmp(key, "cwd")) req.cwd = value;
        else if (!strcmp(key, "arg") && req.argc < MAX_ARGS) req.argv[req.argc++] = value;
        else if (!strcmp(key, "env") && req.envc < MAX_ARGS && strchr(value, '=')) req.env[req.envc++] = value;
        else goto bad;
    }
    req.argv[req.argc] = NULL;
    req.env[req.envc] = NULL;

    if (!strcmp(verb, "STATUS")) {
        answer_status(c);
    } else if (!strcmp(verb, "WAIT")) {
        if (app_state != APP_RUNNING) {
            answer_status(c);
        } else if (in_state[CONN_WAITING] >= MAX_WAITERS) {
            answer(c, "ERR EBUSY too many waiters (at most %d)\n", MAX_WAITERS);
        } else {
            free(c->buf);
            c->buf = NULL;
            set_state(c, CONN_WAITING);
            c->deadline = 0;
        }
    } else if (!strcmp(verb, "ABORT")) {
        int count = 0;
        abort_all(c, &count);
        answer(c, "OK aborted=%d\n", count);
    } else if (!strcmp(verb, "CONNECT")) {
        if (port < 0) goto bad;
        start_connect(c, port, early, early_len);
    } else if (!strcmp(verb, "PTY")) {
        if (req.argc == 0) goto bad;
        start_pty(c, &req, early, early_len);
    } else {
        answer(c, "ERR EPROTO unknown verb %s\n", verb);
    }
    return;
bad:
    answer(c, "ERR EINVAL malformed request\n");
}

static void reading_step(struct conn *c) {
    if (!(c->crev & (POLLIN | POLLHUP | POLLERR))) return;
    ssize_t n = read(c->fd, c->buf + c->len, MAX_LINE - c->len);
    if (n == 0) {
        free_conn(c, 1);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) free_conn(c, 0);
        return;
    }
    c->len += (size_t)n;
    char *nl = memchr(c->buf, '\n', c->len);
    if (!nl) {
        if (c->len >= MAX_LINE) answer(c, "ERR E2BIG request line too long\n");
        return;
    }
    /* Bytes after the request line (a client that did not wait for OK) go to the session. */
    *nl = 0;
    size_t line_len = (size_t)(nl - c->buf) + 1;
    handle_request(c, c->buf, c->buf + line_len, c->len - line_len);
}

/* DRAINING, WAITING: the client closes (having read the answer, or giving up): reset. */
static void closing_step(struct conn *c) {
    if (!(c->crev & (POLLIN | POLLHUP | POLLERR))) return;
    char sink[4096];
    ssize_t n = read(c->fd, sink, sizeof sink);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) free_conn(c, 0);
}

static void on_deadline(struct conn *c) {
    switch (c->state) {
    case CONN_CONNECTING: connect_failed(c, ETIMEDOUT); break;
    case CONN_HANGUP:
        kill_session(c->child, SIGKILL); /* reaped like any orphan */
        free_conn(c, 0);
        break;
    default: free_conn(c, 0); /* too slow to send a request or to close: RST */
    }
}

static void on_accept(int listen_fd) {
    while (pending_count() < MAX_PENDING) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        set_linger(fd, 1);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *slot = NULL;
        for (int i = 0; i < n_slots && !slot; i++)
            if (conns[i].state == CONN_FREE) slot = &conns[i];
        char *buf = slot ? malloc(MAX_LINE + 1) : NULL;
        if (!buf) {
            close(fd); /* RST */
            continue;
        }
        slot->fd = fd;
        slot->buf = buf;
        slot->len = 0;
        set_state(slot, CONN_READING);
        slot->deadline = now_ms() + REQUEST_TIMEOUT_MS;
    }
}

/* Which descriptors of a slot to watch this round: the client socket, and the application's
 * socket or the terminal. An event mask of 0 still reports errors and hang-ups. */
static void watch(const struct conn *c, struct pollfd *client, struct pollfd *other) {
    *client = (struct pollfd){c->fd, 0, 0};
    *other = (struct pollfd){-1, 0, 0};
    switch (c->state) {
    case CONN_READING:
    case CONN_DRAINING:
    case CONN_WAITING: client->events = POLLIN; break;
    case CONN_CONNECTING: *other = (struct pollfd){c->app, POLLOUT, 0}; break;
    case CONN_RELAY:
        if (!c->client_eof && c->to_app_len < c->to_app_cap) client->events |= POLLIN;
        if (c->to_client.len) client->events |= POLLOUT;
        if (!c->app_eof && !c->app_dead && c->to_client.len < 4 * BUF_SIZE) other->events |= POLLIN;
        if (c->to_app_len && !c->app_dead) other->events |= POLLOUT;
        if (other->events) other->fd = c->app;
        break;
    case CONN_PTY:
        if (!c->client_eof && c->in_len < BUF_SIZE + 5) client->events |= POLLIN;
        if (c->to_client.len) client->events |= POLLOUT;
        if (c->master >= 0 && c->to_client.len < 4 * BUF_SIZE) other->events |= POLLIN;
        if (c->master >= 0 && c->to_master_len) other->events |= POLLOUT;
        if (other->events) other->fd = c->master;
        break;
    default: client->fd = -1;
    }
}

static void step(struct conn *c) {
    switch (c->state) {
    case CONN_READING: reading_step(c); break;
    case CONN_DRAINING:
    case CONN_WAITING: closing_step(c); break;
    case CONN_CONNECTING: connecting_step(c); break;
    case CONN_RELAY: relay_step(c); break;
    case CONN_PTY: pty_step(c); break;
    default: break;
    }
}
/* ---------------------------------------------------------------- setup */

static int open_listener(void) {
    char host[64];
    const char *colon = strrchr(listen_spec, ':');
    long port;
    if (!colon || (size_t)(colon - listen_spec) >= sizeof host || parse_long(colon + 1, 1, 65535, &port) < 0) {
        logmsg("bad --listen %s", listen_spec);
        return -1;
    }
    memcpy(host, listen_spec, (size_t)(colon - listen_spec));
    host[colon - listen_spec] = 0;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        logmsg("bad --listen address %s", host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* The interface address may appear a moment after the sandbox starts. */
    for (int tries = 0;; tries++) {
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0) break;
        if (errno != EADDRNOTAVAIL || tries >= 500) {
            logmsg("cannot listen on %s: %s", listen_spec, strerror(errno));
            close(fd);
            return -1;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (listen(fd, 128) < 0) {
        logmsg("listen: %s", strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static int parse_groups(const char *s) {
    app_ngroups = 0;
    if (!*s) return 0;
    char *copy = strdup(s), *save = NULL;
    if (!copy) return -1;
    for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
        long v;
        if (app_ngroups >= (int)(sizeof app_groups / sizeof *app_groups) || parse_long(g, 0, 0x7fffffff, &v) < 0) {
            free(copy);
            return -1;
        }
        app_groups[app_ngroups++] = (gid_t)v;
    }
    free(copy);
    return 0;
}

/*
 * Make the bounding set no larger than what we were given. Some runtimes (bwrap run by root)
 * reduce the effective and permitted sets but leave the bounding set full, which would let a
 * root process regain a dropped capability through execve of a file with capabilities.
 */
static void align_bounding_set(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) < 0) return;
    for (int cap = 0; cap < 64; cap++) {
        int permitted = (data[cap / 32].permitted >> (cap % 32)) & 1;
        if (!permitted && prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    }
}

static void usage(void) {
    logmsg("usage: omv-agent --listen ADDR:PORT [--uid N] [--gid N] [--groups G,...] [--workdir DIR] "
           "[--nofile N] [--max-relays N] -- ARGV...");
    exit(2);
}

static void take_token(void) {
    char *t = getenv("OMV_AGENT_TOKEN");
    if (!t || !*t) {
        logmsg("OMV_AGENT_TOKEN is not set");
        exit(2);
    }
    token_len = strlen(t);
    token = strdup(t);
    if (!token) exit(2);
    /* Wipe the original so /proc/1/environ no longer shows it. */
    memset(t, 'x', token_len);
}

static void build_app_env(void) {
    size_t n = 0;
    for (char **e = environ; *e; e++) n++;
    app_env = calloc(n + 1, sizeof *app_env);
    if (!app_env) exit(2);
    size_t k = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "OMV_AGENT_", 10) != 0) app_env[k++] = *e;
    app_env[k] = NULL;
}

int main(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--listen")) listen_spec = argv[++i];
        else if (!strcmp(argv[i], "--uid") && parse_long(argv[i + 1], 0, 0x7fffffff, &v) == 0) app_uid = (uid_t)v, i++;
        else if (!strcmp(argv[i], "--gid") && parse_long(argv[i + 1], 0, 0x7fffffff, &v) == 0) app_gid = (gid_t)v, i++;
        else if (!strcmp(argv[i], "--groups") && parse_groups(argv[i + 1]) == 0) i++;
        else if (!strcmp(argv[i], "--workdir")) app_workdir = argv[++i];
        else if (!strcmp(argv[i], "--nofile") && parse_long(argv[i + 1], 16, 1 << 20, &v) == 0) app_nofile = v, i++;
        else if (!strcmp(argv[i], "--max-relays") && parse_long(argv[i + 1], 1, MAX_RELAYS_LIMIT, &v) == 0)
            max_relays = v, i++;
        else usage();
    }
    if (!listen_spec || i >= argc) usage();
    app_argv = &argv[i];
    take_token();
    build_app_env();
    align_bounding_set();

    n_slots = MAX_PENDING + (int)max_relays + MAX_PTYS + MAX_WAITERS;
    conns = calloc((size_t)n_slots, sizeof *conns);
    struct pollfd *p = calloc((size_t)n_slots * 2 + 2, sizeof *p);
    int *who = calloc((size_t)n_slots * 2 + 2, sizeof *who); /* 2 * slot + (0 client, 1 other) */
    if (!conns || !p || !who) return 2;
    for (int k = 0; k < n_slots; k++) conns[k] = (struct conn){.state = CONN_FREE, .fd = -1, .app = -1, .master = -1};
    in_state[CONN_FREE] = n_slots;

    if (pipe2(self_pipe, O_CLOEXEC | O_NONBLOCK) < 0) return 2;
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);

    int listen_fd = open_listener();
    if (listen_fd < 0) return 2;
    start_app();

    for (;;) {
        if (got_term && !terminating) {
            terminating = 1;
            if (app_pid > 0) kill(app_pid, got_term);
        }
        reap();
        if (terminating && app_pid < 0) exit(app_state == APP_RUNNING ? 0 : app_status & 0xff);

        long long now = now_ms(), next = now + 60000;
        /* While MAX_PENDING connections are being served, new ones wait in the listen backlog. */
        p[0] = (struct pollfd){pending_count() < MAX_PENDING ? listen_fd : -1, POLLIN, 0};
        p[1] = (struct pollfd){self_pipe[0], POLLIN, 0};
        int np = 2;
        for (int k = 0; k < n_slots; k++) {
            struct conn *c = &conns[k];
            if (c->state == CONN_FREE) continue;
            if (c->deadline && c->deadline < next) next = c->deadline;
            struct pollfd client, other;
            watch(c, &client, &other);
            if (client.fd >= 0) {
                who[np] = 2 * k;
                p[np++] = client;
            }
            if (other.fd >= 0) {
                who[np] = 2 * k + 1;
                p[np++] = other;
            }
        }
        int r = poll(p, (nfds_t)np, next > now ? (int)(next - now) : 0);
        if (r < 0 && errno != EINTR) continue;
        for (int i = 2; r > 0 && i < np; i++) {
            struct conn *c = &conns[who[i] / 2];
            if (who[i] % 2) c->orev = p[i].revents;
            else c->crev = p[i].revents;
        }
        if (r > 0 && p[1].revents) {
            char sink[64];
            while (read(self_pipe[0], sink, sizeof sink) > 0) {
            }
        }
        reap(); /* before the sessions run: a terminal's exit is reported in this round */
        now = now_ms();
        for (int k = 0; k < n_slots; k++)
            if (conns[k].state != CONN_FREE && conns[k].deadline && conns[k].deadline <= now) on_deadline(&conns[k]);
        if (r > 0 && (p[0].revents & POLLIN)) on_accept(listen_fd);
        for (int k = 0; k < n_slots; k++) {
            if (conns[k].state != CONN_FREE) step(&conns[k]);
            conns[k].crev = conns[k].orev = 0;
        }
    }
}
