/*
 * Terminal sessions (PTY): a command on a pseudo-terminal, with framed I/O both ways.
 *
 * The client's frames carry terminal input, resizes and signals; the agent's carry the
 * terminal's output and, last, the exit status. The command's exit is learnt from reap() (app.c)
 * through pty_reaped(). A client that leaves before the command ends hangs it up: the slot turns
 * HANGUP, holding no socket, until the command exits or HANGUP_GRACE_MS passes and it is killed.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pty.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

extern char **environ;

/* The client's frames wait here until whole: one header and the largest payload allowed. */
#define PTY_INPUT_CAP (MAX_CLIENT_FRAME + FRAME_HEADER_SIZE)

/* A terminal session's command: the signal to its process group (and to itself, should it have left it). */
void kill_session(pid_t child, int sig) {
    if (child > 0) {
        kill(-child, sig);
        kill(child, sig);
    }
}

static void set_nonblock(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

/* In the forked child, on the terminal already. Errors go to the terminal, which is the client's
 * screen, hence the \r\n. */
__attribute__((noreturn)) static void pty_child(struct pty_request *req) {
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

void start_pty(struct conn *c, struct pty_request *req, const char *early, size_t early_len) {
    if (pty_count() >= MAX_PTYS) {
        answer(c, "ERR " ERR_BUSY " too many terminal sessions (at most %d)\n", MAX_PTYS);
        return;
    }
    if (early_len > PTY_INPUT_CAP) {
        free_conn(c, 0);
        return;
    }
    char *in = malloc(PTY_INPUT_CAP), *to_master = malloc(BUF_SIZE);
    if (!in || !to_master) {
        free(in);
        free(to_master);
        answer(c, "ERR " ERR_OUT_OF_MEMORY " out of memory\n");
        return;
    }
    int master;
    struct winsize ws = {(unsigned short)req->rows, (unsigned short)req->cols, 0, 0};
    pid_t child = forkpty(&master, NULL, NULL, &ws);
    if (child < 0) {
        int err = errno;
        free(in);
        free(to_master);
        answer(c, "ERR " ERR_NO_PTY " cannot open a pseudo-terminal: %s\n", strerror(err));
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
    write_all(c->fd, line, (size_t)n, ANSWER_WRITE_MS);
}

/* reap() found a child that is not the application: if it is a session's command, record it. */
void pty_reaped(pid_t pid, int wait_status) {
    for (int i = 0; i < n_slots; i++) {
        struct conn *c = &conns[i];
        if (c->child != pid || (c->state != CONN_PTY && c->state != CONN_HANGUP)) continue;
        if (c->state == CONN_HANGUP) {
            free_conn(c, 0);
        } else {
            c->exited = 1;
            c->status = exit_code(wait_status);
            c->child = -1;
        }
        break;
    }
}

/* Apply every complete frame in `in`; a partial frame stays for the next read. -1: protocol error. */
static int pty_decode(char *in, size_t *in_len, char *to_master, size_t *to_master_len, int master, pid_t child,
                      int exited) {
    size_t off = 0;
    while (*in_len - off >= FRAME_HEADER_SIZE) {
        uint32_t be;
        memcpy(&be, in + off + 1, 4);
        size_t len = ntohl(be);
        if (len > MAX_CLIENT_FRAME) return -1;
        if (*in_len - off < FRAME_HEADER_SIZE + len) break;
        char type = in[off];
        char *payload = in + off + FRAME_HEADER_SIZE;
        if (type == FRAME_DATA) {
            if (*to_master_len + len > BUF_SIZE) break; /* wait until the terminal took more */
            if (master >= 0) {
                memcpy(to_master + *to_master_len, payload, len);
                *to_master_len += len;
            }
        } else if (type == FRAME_RESIZE && len < 32) {
            char tmp[32];
            memcpy(tmp, payload, len);
            tmp[len] = 0;
            unsigned rows, cols;
            if (sscanf(tmp, "%u %u", &rows, &cols) == 2 && master >= 0 && rows < 65536 && cols < 65536) {
                struct winsize w = {(unsigned short)rows, (unsigned short)cols, 0, 0};
                ioctl(master, TIOCSWINSZ, &w);
            }
        } else if (type == FRAME_SIGNAL && len < 16) {
            char tmp[16];
            memcpy(tmp, payload, len);
            tmp[len] = 0;
            long sig;
            if (parse_long(tmp, 1, 64, &sig) == 0 && !exited) kill(-child, (int)sig);
        } else {
            return -1;
        }
        off += FRAME_HEADER_SIZE + len;
    }
    memmove(in, in + off, *in_len - off);
    *in_len -= off;
    return 0;
}

static void pty_reset(struct conn *c) {
    if (!c->exited) kill_session(c->child, SIGKILL);
    free_conn(c, 0);
}

void pty_step(struct conn *c) {
    short cr = c->crev, mr = c->orev;
    if (cr & (POLLIN | POLLHUP | POLLERR)) {
        if (!c->client_eof && c->in_len < PTY_INPUT_CAP) {
            ssize_t n = read(c->fd, c->in + c->in_len, PTY_INPUT_CAP - c->in_len);
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
            if (out_frame(&c->to_client, FRAME_DATA, io_buf, (size_t)n) < 0 || out_flush(&c->to_client, c->fd) < 0) {
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
            if (out_frame(&c->to_client, FRAME_DATA, io_buf, (size_t)n) < 0) {
                pty_reset(c);
                return;
            }
        }
        if (c->master >= 0) close(c->master);
        c->master = -1;
        char code[16];
        int n = snprintf(code, sizeof code, "%d", c->status);
        if (out_frame(&c->to_client, FRAME_EXIT, code, (size_t)n) < 0 || out_flush(&c->to_client, c->fd) < 0) {
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
