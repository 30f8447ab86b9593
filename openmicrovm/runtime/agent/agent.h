/*
 * What the agent's files share: the connection slots the poll() loop serves, the application's
 * state, and the functions one mechanism calls in another. Wire constants are in protocol.h.
 *
 *   agent.c  start-up, the poll() loop and the slots
 *   wire.c   reading and answering requests, framing, socket helpers
 *   app.c    the application: starting it, STATUS, WAIT, reaping children
 *   relay.c  CONNECT relays
 *   pty.c    terminal sessions
 */
#ifndef OMV_AGENT_H
#define OMV_AGENT_H

#define _GNU_SOURCE /* before any system header: accept4, pipe2, forkpty */
#include <signal.h>
#include <stddef.h>
#include <sys/types.h>

#include "protocol.h"

#define MAX_PENDING 64          /* connections sending their request or reading a one-line answer */
#define BUF_SIZE 65536          /* one read from a socket or terminal; a buffer's unit of growth */
#define HANGUP_GRACE_MS 1000    /* a hung-up terminal command gets this long before SIGKILL */
#define ANSWER_WRITE_MS 2000    /* how long an answer line may wait for room in the socket */

#if MAX_CLIENT_FRAME > BUF_SIZE
#error "a whole input frame must fit in a terminal's input buffer"
#endif

/* ---------------------------------------------------------------- agent.c */

void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
long long now_ms(void);

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

/* Bytes queued for a non-blocking socket. */
struct outbuf {
    char *data;
    size_t len, cap;
};

struct conn {
    enum conn_state state;
    int fd;             /* the client socket */
    long long deadline; /* 0: none */
    short crev, orev;   /* poll results of this round: client socket, other descriptor */
    /* READING */
    char *buf;
    size_t len;
    /* CONNECTING, RELAY */
    int app_fd; /* the connection to the application's port */
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

/* One slot per connection the agent may hold at once; allocated once at start. */
extern struct conn *conns;
extern int n_slots;
extern int in_state[CONN_STATES]; /* how many slots are in each state */
extern char io_buf[BUF_SIZE];     /* scratch for one read; nothing stays in it between steps */

void set_state(struct conn *c, enum conn_state state);
void free_conn(struct conn *c, int graceful);

static inline int pending_count(void) { return in_state[CONN_READING] + in_state[CONN_DRAINING]; }
static inline int relay_count(void) { return in_state[CONN_CONNECTING] + in_state[CONN_RELAY]; }
static inline int pty_count(void) { return in_state[CONN_PTY] + in_state[CONN_HANGUP]; }

/* ---------------------------------------------------------------- wire.c */

void take_token(void);
int parse_long(const char *s, long min, long max, long *out);
void set_linger(int fd, int on);
void close_graceful(int fd);
int write_all(int fd, const void *data, size_t len, int timeout_ms);
int out_frame(struct outbuf *o, char type, const void *payload, size_t len);
int out_flush(struct outbuf *o, int fd);
void answer(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void reading_step(struct conn *c);
void closing_step(struct conn *c);

/* ---------------------------------------------------------------- app.c */

enum app_state { APP_RUNNING, APP_EXITED, APP_FAILED };

/* The application: how the command line says to start it, and what became of it. */
struct application {
    char **argv;
    char **env; /* the agent's environment minus OMV_AGENT_* */
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups; /* -1: keep the groups unchanged */
    const char *workdir;
    long nofile;
    enum app_state state;
    int status; /* exit code, 128+signal, or errno when exec failed */
    pid_t pid;  /* -1 once reaped */
};

extern struct application application;
extern volatile sig_atomic_t got_child;

void reset_signals(void);
int exit_code(int wait_status);
void start_app(void);
void answer_status(struct conn *c);
void start_wait(struct conn *c);
void reap(void);

/* ---------------------------------------------------------------- relay.c */

extern long max_relays;

void start_connect(struct conn *c, long port, const char *early, size_t early_len);
void connect_failed(struct conn *c, int err);
void connecting_step(struct conn *c);
void relay_step(struct conn *c);

/* ---------------------------------------------------------------- pty.c */

struct pty_request {
    long rows, cols, uid, gid;
    const char *cwd;
    char *argv[MAX_ARGS + 1];
    int argc;
    char *env[MAX_ARGS + 1];
    int envc;
};

void start_pty(struct conn *c, struct pty_request *req, const char *early, size_t early_len);
void pty_step(struct conn *c);
void pty_reaped(pid_t pid, int wait_status);
void kill_session(pid_t child, int sig);

#endif
