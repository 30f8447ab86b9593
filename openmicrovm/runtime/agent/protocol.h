/*
 * The control protocol between the host (openmicrovm/runtime/agent_client.py) and omv-agent.
 *
 * Every value the two sides must agree on is defined here. The Python side keeps plain constants
 * of its own; tests/runtime/test_agent_protocol.py reads this file and fails when they disagree,
 * so a change here goes with the same change there. Keep each one a plain `#define NAME value`
 * (a number, a 'c' or a "string") so that the test can read it.
 *
 * Version 1. A connection carries exactly one request: a line of at most MAX_REQUEST_LINE bytes
 * including its newline, which may arrive in several pieces:
 *
 *     OMV1 <token> <VERB> [key=value ...]\n
 *
 * The token is the secret the host handed the agent in $OMV_AGENT_TOKEN. Values are
 * percent-encoded (%XX), which lets them carry spaces, '=' and any other byte except NUL. The
 * agent answers with one line: "OK [key=value ...]\n", or "ERR <CODE> <message>\n" where CODE is
 * one of the ERR_* values below (or "E<number>" for an errno the agent has no name for).
 *
 *   STATUS   OK app=running|exited|failed status=N pid=N disk=BYTES
 *            status: the exit code, 128+signal, or the errno of a failed exec. disk: bytes in use
 *            on "/", plus "/tmp" when that is a filesystem of its own.
 *   WAIT     The STATUS answer, sent when the application is no longer running (at once if it
 *            already is not); until then the connection just stays open. EBUSY past MAX_WAITERS.
 *   ABORT    OK aborted=N. Resets every other connection: relays, terminal sessions (their
 *            commands are killed), WAITs and requests in progress. The host sends it before
 *            every checkpoint, which a connected socket in the sandbox would make fail.
 *   CONNECT port=N
 *            OK, then the connection is relayed to 127.0.0.1:N inside the sandbox. ECONNREFUSED
 *            when nothing listens there, ETIMEDOUT when the application does not accept within
 *            CONNECT_TIMEOUT_MS, EMAXCONN when --max-relays relays are running already.
 *   PTY rows=R cols=C arg=A... [env=K=V...] [cwd=DIR] [uid=N] [gid=N]
 *            OK pid=N, then a terminal session running the args as a command. EBUSY past
 *            MAX_PTYS. At most MAX_ARGS arg= and as many env= fields.
 *
 * After OK, everything the agent sends is framed: one type byte, the payload's length as four
 * bytes big-endian, then the payload. The agent sends FRAME_DATA, FRAME_END (CONNECT: the
 * application closed its side) and FRAME_EXIT (PTY: the command's exit status in decimal,
 * 128+signal when a signal ended it). On a CONNECT the host sends raw bytes and half-closes when
 * it has nothing more to send. On a PTY the host sends frames as well: FRAME_DATA (terminal
 * input), FRAME_RESIZE ("ROWS COLS" in decimal) and FRAME_SIGNAL (a signal number for the
 * command's process group). A frame of another type, or a payload over MAX_CLIENT_FRAME (or an
 * over-long resize or signal payload), resets the session. The host need not wait for OK: what it
 * sends after the request line goes to the relay or the session.
 *
 * Who closes first matters. gVisor (2022) will not checkpoint while a TCP endpoint on the
 * sandbox's interface is connected, and the side that closes first keeps its socket in TIME_WAIT
 * for 60 s, which inside gVisor no RST cuts short. So the host always closes first, and the agent
 * closes only once it has read the host's EOF: it reports "no more data" with a FRAME_END rather
 * than a FIN, leaving TIME_WAIT on the host. A connection the agent must drop (ABORT, a protocol
 * error, a deadline) ends in a RST, which leaves nothing behind in the sandbox; so does a
 * one-line answer once the host has read it and closed. A relay or terminal session that ends
 * normally closes gracefully so that queued bytes still arrive; its socket then spends a round
 * trip in LAST_ACK, which the host covers by retrying a checkpoint that finds a connection open.
 */
#ifndef OMV_PROTOCOL_H
#define OMV_PROTOCOL_H

/* Requests */
#define PROTOCOL_WORD "OMV1"      /* first word of every request line: protocol version 1 */
#define MAX_REQUEST_LINE 65536    /* longest request line, newline included; longer gets E2BIG */
#define MAX_ANSWER_LINE 511       /* longest answer line the agent sends; it cuts longer ones here */
#define MAX_ARGS 1024             /* most arg= (and, separately, env=) fields in one PTY request */
#define AGENT_PORT 65199          /* the port the host names in --listen; outside Linux's ephemeral range */

/* Frames */
#define FRAME_HEADER_SIZE 5       /* type byte + 4-byte big-endian payload length */
#define MAX_CLIENT_FRAME 65536    /* largest payload the agent takes in one frame from the host */
#define FRAME_DATA 'd'            /* both ways: relayed bytes, terminal output or terminal input */
#define FRAME_END 'e'             /* agent: the application closed its side of a CONNECT */
#define FRAME_EXIT 'x'            /* agent: the PTY command exited; payload is its status in decimal */
#define FRAME_RESIZE 'r'          /* host: new terminal size, payload "ROWS COLS" */
#define FRAME_SIGNAL 'k'          /* host: signal number to send to the PTY command's process group */

/* Limits, each reached is answered with an ERR the host turns into its own error */
#define DEFAULT_MAX_RELAYS 128    /* CONNECT relays at once unless --max-relays says otherwise */
#define MAX_RELAYS_LIMIT 4096     /* highest --max-relays the agent accepts */
#define MAX_PTYS 16               /* terminal sessions at once, including ones being hung up */
#define MAX_WAITERS 8             /* WAIT connections at once */

/* Deadlines; the host's own timeouts must fit around them */
#define REQUEST_TIMEOUT_MS 10000  /* the whole request line must arrive within this; else RST */
#define DRAIN_TIMEOUT_MS 10000    /* after a one-line answer the host must close within this; else RST */
#define CONNECT_TIMEOUT_MS 8000   /* CONNECT gives up (ETIMEDOUT) here, before the host's reply timeout */

/* Error codes: the word after "ERR " */
#define ERR_PROTOCOL "EPROTO"                 /* not an OMV1 request, or a verb this agent does not know */
#define ERR_BAD_TOKEN "EACCES"                /* the token is wrong */
#define ERR_MALFORMED "EINVAL"                /* a field is unknown, out of range or badly encoded */
#define ERR_LINE_TOO_LONG "E2BIG"             /* no newline within MAX_REQUEST_LINE bytes */
#define ERR_BUSY "EBUSY"                      /* MAX_PTYS sessions or MAX_WAITERS waiters already */
#define ERR_TOO_MANY_RELAYS "EMAXCONN"        /* --max-relays CONNECT relays already */
#define ERR_OUT_OF_MEMORY "ENOMEM"            /* the agent could not allocate a session's buffers */
#define ERR_NO_PTY "EPTY"                     /* no pseudo-terminal could be opened */
#define ERR_CONNECTION_REFUSED "ECONNREFUSED" /* CONNECT: nothing listens on the port */
#define ERR_TIMED_OUT "ETIMEDOUT"             /* CONNECT: not accepted within CONNECT_TIMEOUT_MS */
#define ERR_NETWORK_UNREACHABLE "ENETUNREACH" /* CONNECT: the sandbox has no loopback route */
#define ERR_ADDRESS_NOT_AVAILABLE "EADDRNOTAVAIL" /* CONNECT: no local port left for the connection */
#define ERR_TOO_MANY_FILES "EMFILE"           /* CONNECT: the agent ran out of file descriptors */

#endif
