/*
 * omv-agent: the init process (PID 1) of every openmicrovm sandbox.
 *
 * It starts the application, reaps zombies, passes SIGTERM/SIGINT on to the application, and
 * serves the control protocol of protocol.h on one TCP address inside the sandbox. Through it the
 * host reaches services the application binds to 127.0.0.1 (inside gVisor that loopback belongs
 * to gVisor's own netstack, out of reach of any host socket), asks whether the application is
 * alive, and runs commands on a pseudo-terminal.
 *
 * Usage:
 *   omv-agent --listen ADDR:PORT [--uid N] [--gid N] [--groups G1,G2] [--workdir DIR]
 *             [--nofile N] [--max-relays N] -- ARGV...
 * The application inherits the agent's environment without the OMV_AGENT_* variables. The
 * shared secret comes from $OMV_AGENT_TOKEN and is wiped there, so that an application running
 * as another user cannot read it from /proc/1/environ and drive the agent.
 *
 * One process serves everything: each connection, relay and terminal session is a slot of the
 * one poll() loop below, never a process of its own. Under gVisor's ptrace platform each guest
 * process is a host process, with a host thread for every sentry thread that ran it, all counted
 * against the sandbox's pids cgroup; an agent that forked per connection let a flood of
 * connections fill that cgroup until gVisor could not create a thread and died. So the number of
 * slots is fixed at start: MAX_PENDING connections sending a request or reading a one-line answer
 * (more wait in the listen backlog), --max-relays CONNECT relays (one more gets EMAXCONN, which
 * the host reports as "too many connections", HTTP 429 at the endpoint), MAX_PTYS terminal
 * sessions and MAX_WAITERS WAIT watchers (one more of either gets EBUSY).
 *
 * This file holds start-up, the loop and the slots; agent.h says where the rest is.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

struct conn *conns;
int n_slots;
int in_state[CONN_STATES];
char io_buf[BUF_SIZE];

static const char *listen_spec;
static int self_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_term;
static int terminating;

void logmsg(const char *fmt, ...) {
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

long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- slots */

/* Every state change goes through here, so that the per-state counts the limits use stay true. */
void set_state(struct conn *c, enum conn_state state) {
    in_state[c->state]--;
    in_state[state]++;
    c->state = state;
}

/* Release a slot. graceful: the client's EOF was read (linger off); else the client gets a RST. */
void free_conn(struct conn *c, int graceful) {
    if (c->fd >= 0) {
        if (graceful) close_graceful(c->fd);
        else close(c->fd);
    }
    if (c->app_fd >= 0) close(c->app_fd);
    if (c->master >= 0) close(c->master);
    free(c->buf);
    free(c->to_app);
    free(c->to_client.data);
    free(c->in);
    free(c->to_master);
    in_state[c->state]--;
    in_state[CONN_FREE]++;
    *c = (struct conn){.state = CONN_FREE, .fd = -1, .app_fd = -1, .master = -1};
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
        set_linger(fd, 1); /* until the client's EOF is read, closing means RST (protocol.h) */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *slot = NULL;
        for (int i = 0; i < n_slots && !slot; i++)
            if (conns[i].state == CONN_FREE) slot = &conns[i];
        char *buf = slot ? malloc(MAX_REQUEST_LINE + 1) : NULL;
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
 * socket or the terminal. An event mask of 0 still reports errors and hang-ups. The buffer
 * limits here are what keeps a fast sender from making the agent queue without end. */
static void watch(const struct conn *c, struct pollfd *client, struct pollfd *other) {
    *client = (struct pollfd){c->fd, 0, 0};
    *other = (struct pollfd){-1, 0, 0};
    switch (c->state) {
    case CONN_READING:
    case CONN_DRAINING:
    case CONN_WAITING: client->events = POLLIN; break;
    case CONN_CONNECTING: *other = (struct pollfd){c->app_fd, POLLOUT, 0}; break;
    case CONN_RELAY:
        if (!c->client_eof && c->to_app_len < c->to_app_cap) client->events |= POLLIN;
        if (c->to_client.len) client->events |= POLLOUT;
        if (!c->app_eof && !c->app_dead && c->to_client.len < 4 * BUF_SIZE) other->events |= POLLIN;
        if (c->to_app_len && !c->app_dead) other->events |= POLLOUT;
        if (other->events) other->fd = c->app_fd;
        break;
    case CONN_PTY:
        if (!c->client_eof && c->in_len < MAX_CLIENT_FRAME + FRAME_HEADER_SIZE) client->events |= POLLIN;
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
    application.ngroups = 0;
    if (!*s) return 0;
    char *copy = strdup(s), *save = NULL;
    if (!copy) return -1;
    const int most = (int)(sizeof application.groups / sizeof *application.groups);
    for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
        long v;
        if (application.ngroups >= most || parse_long(g, 0, 0x7fffffff, &v) < 0) {
            free(copy);
            return -1;
        }
        application.groups[application.ngroups++] = (gid_t)v;
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

static void build_app_env(void) {
    size_t n = 0;
    for (char **e = environ; *e; e++) n++;
    application.env = calloc(n + 1, sizeof *application.env);
    if (!application.env) exit(2);
    size_t k = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "OMV_AGENT_", 10) != 0) application.env[k++] = *e;
    application.env[k] = NULL;
}

/* Signal handlers only note what came and wake poll() through the self-pipe; the loop acts. */
static void on_signal(int sig) {
    int saved = errno;
    if (sig == SIGTERM || sig == SIGINT) got_term = sig;
    if (sig == SIGCHLD) got_child = 1;
    char b = (char)sig;
    ssize_t ignored = write(self_pipe[1], &b, 1);
    (void)ignored;
    errno = saved;
}

static void parse_arguments(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--listen")) listen_spec = argv[++i];
        else if (!strcmp(argv[i], "--uid") && parse_long(argv[i + 1], 0, 0x7fffffff, &v) == 0)
            application.uid = (uid_t)v, i++;
        else if (!strcmp(argv[i], "--gid") && parse_long(argv[i + 1], 0, 0x7fffffff, &v) == 0)
            application.gid = (gid_t)v, i++;
        else if (!strcmp(argv[i], "--groups") && parse_groups(argv[i + 1]) == 0) i++;
        else if (!strcmp(argv[i], "--workdir")) application.workdir = argv[++i];
        else if (!strcmp(argv[i], "--nofile") && parse_long(argv[i + 1], 16, 1 << 20, &v) == 0)
            application.nofile = v, i++;
        else if (!strcmp(argv[i], "--max-relays") && parse_long(argv[i + 1], 1, MAX_RELAYS_LIMIT, &v) == 0)
            max_relays = v, i++;
        else usage();
    }
    if (!listen_spec || i >= argc) usage();
    application.argv = &argv[i];
}

int main(int argc, char **argv) {
    parse_arguments(argc, argv);
    take_token();
    build_app_env();
    align_bounding_set();

    n_slots = MAX_PENDING + (int)max_relays + MAX_PTYS + MAX_WAITERS;
    conns = calloc((size_t)n_slots, sizeof *conns);
    struct pollfd *p = calloc((size_t)n_slots * 2 + 2, sizeof *p);
    int *who = calloc((size_t)n_slots * 2 + 2, sizeof *who); /* 2 * slot + (0 client, 1 other) */
    if (!conns || !p || !who) return 2;
    for (int k = 0; k < n_slots; k++)
        conns[k] = (struct conn){.state = CONN_FREE, .fd = -1, .app_fd = -1, .master = -1};
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
            if (application.pid > 0) kill(application.pid, got_term);
        }
        reap();
        if (terminating && application.pid < 0)
            exit(application.state == APP_RUNNING ? 0 : application.status & 0xff);

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
