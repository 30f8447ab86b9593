/*
 * The wire: reading a request line and dispatching it, one-line answers, frames, and the socket
 * helpers behind the closing rules of protocol.h.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char *token;
static size_t token_len;

/* Keep the secret and wipe $OMV_AGENT_TOKEN, so that /proc/1/environ no longer shows it. */
void take_token(void) {
    char *t = getenv("OMV_AGENT_TOKEN");
    if (!t || !*t) {
        logmsg("OMV_AGENT_TOKEN is not set");
        exit(2);
    }
    token_len = strlen(t);
    token = strdup(t);
    if (!token) exit(2);
    memset(t, 'x', token_len);
}

/* Compares every byte whatever the input, so the time taken tells nothing about the token. */
static int token_ok(const char *given) {
    size_t n = strlen(given);
    unsigned char diff = (unsigned char)(n != token_len);
    for (size_t i = 0; i < token_len; i++) diff |= (unsigned char)(token[i] ^ (i < n ? given[i] : 0));
    return diff == 0;
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

int parse_long(const char *s, long min, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) return -1;
    *out = v;
    return 0;
}

/* ---------------------------------------------------------------- sockets */

void set_linger(int fd, int on) {
    struct linger lg = {on, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Close a client socket after the client's EOF: linger off, so queued bytes still go out. */
void close_graceful(int fd) {
    set_linger(fd, 0);
    close(fd);
}

/* Write everything, waiting on a non-blocking socket; gives up after timeout_ms of no progress. */
int write_all(int fd, const void *data, size_t len, int timeout_ms) {
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

/* ---------------------------------------------------------------- frames */

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

/* Queue one frame: the type byte, the length big-endian, the payload. */
int out_frame(struct outbuf *o, char type, const void *payload, size_t len) {
    if (out_reserve(o, len + FRAME_HEADER_SIZE) < 0) return -1;
    char *p = o->data + o->len;
    p[0] = type;
    uint32_t be = htonl((uint32_t)len);
    memcpy(p + 1, &be, 4);
    if (len) memcpy(p + FRAME_HEADER_SIZE, payload, len);
    o->len += len + FRAME_HEADER_SIZE;
    return 0;
}

/* Send what the socket takes now; -1 on a hard error. */
int out_flush(struct outbuf *o, int fd) {
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

/* ---------------------------------------------------------------- answers */

/* Answer with one line and wait for the client to close (DRAINING). */
void answer(struct conn *c, const char *fmt, ...) {
    char line[MAX_ANSWER_LINE + 1];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line) n = sizeof line - 1;
    if (n > 0) write_all(c->fd, line, (size_t)n, ANSWER_WRITE_MS);
    free(c->buf);
    c->buf = NULL;
    set_state(c, CONN_DRAINING);
    c->deadline = now_ms() + DRAIN_TIMEOUT_MS;
}

/* ABORT: reset every other slot; a terminal command still running is killed. */
static int abort_all(struct conn *except) {
    int count = 0;
    for (int i = 0; i < n_slots; i++) {
        struct conn *c = &conns[i];
        if (c->state == CONN_FREE || c == except) continue;
        if ((c->state == CONN_PTY && !c->exited) || c->state == CONN_HANGUP) kill_session(c->child, SIGKILL);
        free_conn(c, 0);
        count++;
    }
    return count;
}

/* ---------------------------------------------------------------- requests */

/* line: the request without its newline; early: what the client sent after it. */
static void handle_request(struct conn *c, char *line, const char *early, size_t early_len) {
    char *words[MAX_ARGS * 2 + 8];
    int n = 0;
    for (char *save = NULL, *w = strtok_r(line, " \r", &save); w && n < (int)(sizeof words / sizeof *words);
         w = strtok_r(NULL, " \r", &save))
        words[n++] = w;
    if (n < 3 || strcmp(words[0], PROTOCOL_WORD) != 0) {
        answer(c, "ERR " ERR_PROTOCOL " expected: " PROTOCOL_WORD " <token> <verb> [key=value ...]\n");
        return;
    }
    if (!token_ok(words[1])) {
        answer(c, "ERR " ERR_BAD_TOKEN " bad token\n");
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
        start_wait(c);
    } else if (!strcmp(verb, "ABORT")) {
        int count = abort_all(c);
        answer(c, "OK aborted=%d\n", count);
    } else if (!strcmp(verb, "CONNECT")) {
        if (port < 0) goto bad;
        start_connect(c, port, early, early_len);
    } else if (!strcmp(verb, "PTY")) {
        if (req.argc == 0) goto bad;
        start_pty(c, &req, early, early_len);
    } else {
        answer(c, "ERR " ERR_PROTOCOL " unknown verb %s\n", verb);
    }
    return;
bad:
    answer(c, "ERR " ERR_MALFORMED " malformed request\n");
}

/* READING: gather the request line; partial reads are reassembled in c->buf. */
void reading_step(struct conn *c) {
    if (!(c->crev & (POLLIN | POLLHUP | POLLERR))) return;
    ssize_t n = read(c->fd, c->buf + c->len, MAX_REQUEST_LINE - c->len);
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
        if (c->len >= MAX_REQUEST_LINE) answer(c, "ERR " ERR_LINE_TOO_LONG " request line too long\n");
        return;
    }
    /* Bytes after the request line (a client that did not wait for OK) go to the session. */
    *nl = 0;
    size_t line_len = (size_t)(nl - c->buf) + 1;
    handle_request(c, c->buf, c->buf + line_len, c->len - line_len);
}

/* DRAINING, WAITING: the client closes (having read the answer, or giving up): reset. */
void closing_step(struct conn *c) {
    if (!(c->crev & (POLLIN | POLLHUP | POLLERR))) return;
    char sink[4096];
    ssize_t n = read(c->fd, sink, sizeof sink);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) free_conn(c, 0);
}
