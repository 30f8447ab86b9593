/*
 * CONNECT relays: the host reaches 127.0.0.1:port inside the sandbox through the agent, because
 * under gVisor that loopback lives in gVisor's netstack where no host socket can reach it.
 *
 * A slot goes CONNECTING (the non-blocking connect to the application runs, at most
 * CONNECT_TIMEOUT_MS) and then RELAY, where bytes from the client pass through raw and bytes from
 * the application go back framed, so that the application closing its side can be told with a
 * FRAME_END instead of a FIN (protocol.h says why the agent never closes first).
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

long max_relays = DEFAULT_MAX_RELAYS;

/* The code word of an ERR answer for a failed connection to the application. */
static void errno_name(int err, char *out, size_t size) {
    const char *name;
    switch (err) {
    case ECONNREFUSED: name = ERR_CONNECTION_REFUSED; break;
    case ETIMEDOUT: name = ERR_TIMED_OUT; break;
    case ENETUNREACH: name = ERR_NETWORK_UNREACHABLE; break;
    case EADDRNOTAVAIL: name = ERR_ADDRESS_NOT_AVAILABLE; break;
    case EMFILE: name = ERR_TOO_MANY_FILES; break;
    default: snprintf(out, size, "E%d", err); return;
    }
    snprintf(out, size, "%s", name);
}

static void relay_reset(struct conn *c) { free_conn(c, 0); }

/* No OK was sent yet, so the client still reads a one-line answer: the slot becomes pending again. */
void connect_failed(struct conn *c, int err) {
    char name[32];
    errno_name(err, name, sizeof name);
    close(c->app_fd);
    c->app_fd = -1;
    free(c->to_app);
    c->to_app = NULL;
    c->to_app_len = c->to_app_cap = 0;
    set_state(c, CONN_READING); /* counted as pending again while the answer is read */
    answer(c, "ERR %s %s on 127.0.0.1:%ld\n", name, strerror(err), c->port);
}

static void connected(struct conn *c) {
    int one = 1;
    setsockopt(c->app_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->deadline = 0;
    set_state(c, CONN_RELAY);
    /* A fresh socket takes three bytes without waiting. */
    write_all(c->fd, "OK\n", 3, ANSWER_WRITE_MS);
}

/* CONNECT port=N: early holds the bytes the client sent after its request line. */
void start_connect(struct conn *c, long port, const char *early, size_t early_len) {
    if (relay_count() >= max_relays) {
        answer(c,
               "ERR " ERR_TOO_MANY_RELAYS
               " too many connections: %ld are being relayed, the most this sandbox takes\n",
               max_relays);
        return;
    }
    size_t cap = early_len > BUF_SIZE ? early_len : BUF_SIZE;
    char *to_app = malloc(cap);
    if (!to_app) {
        answer(c, "ERR " ERR_OUT_OF_MEMORY " out of memory\n");
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
    c->app_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->app_fd < 0) {
        connect_failed(c, errno);
        return;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->app_fd, (struct sockaddr *)&sa, sizeof sa) == 0) connected(c);
    else if (errno != EINPROGRESS && errno != EINTR) connect_failed(c, errno);
}

void connecting_step(struct conn *c) {
    if (c->crev & (POLLERR | POLLHUP)) {
        relay_reset(c); /* the client gave up */
        return;
    }
    if (!(c->orev & (POLLOUT | POLLERR | POLLHUP))) return;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->app_fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == 0) connected(c);
    else connect_failed(c, err);
}

/*
 * Relay between the client socket (raw in, framed out) and the application's socket.
 * Ends when the client has closed (its EOF read) and the application's end has been delivered.
 */
void relay_step(struct conn *c) {
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
        ssize_t n = read(c->app_fd, io_buf, sizeof io_buf);
        if (n > 0) {
            if (out_frame(&c->to_client, FRAME_DATA, io_buf, (size_t)n) < 0) {
                relay_reset(c);
                return;
            }
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
            c->app_eof = 1;
            if (out_frame(&c->to_client, FRAME_END, NULL, 0) < 0) {
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
        ssize_t n = write(c->app_fd, c->to_app, c->to_app_len);
        if (n > 0) {
            memmove(c->to_app, c->to_app + n, c->to_app_len - (size_t)n);
            c->to_app_len -= (size_t)n;
        } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
            /* The application stopped reading for good: drop what the client still sends, and
             * tell the client its side ended if it has not heard so yet. */
            c->app_dead = 1;
            c->to_app_len = 0;
            if (!c->app_eof) {
                c->app_eof = 1;
                if (out_frame(&c->to_client, FRAME_END, NULL, 0) < 0) {
                    relay_reset(c);
                    return;
                }
            }
        }
    }
    if (c->client_eof && c->to_app_len == 0 && !c->app_wr_closed && !c->app_dead) {
        shutdown(c->app_fd, SHUT_WR); /* pass the client's half-close on */
        c->app_wr_closed = 1;
    }
    if (c->to_client.len == 0 && c->to_client.cap > 4 * BUF_SIZE && !(ar & POLLIN)) {
        free(c->to_client.data); /* a burst is over: give its memory back */
        c->to_client = (struct outbuf){0};
    }
    if (c->client_eof && (c->app_eof || c->app_dead) && c->to_client.len == 0) free_conn(c, 1);
}
