/* mme_sim entry point: wait for the EIR peer, send the ECRs, collect the answers, stop.
 *
 * Threads: freeDiameterd's own (peer state machines, routing, dispatch: the answer callback
 * runs on a dispatch thread, the timeout callback on a timer thread) and one of ours, the
 * sender. They meet in `flow`: the sender waits there for the peer, for room in the window,
 * for its next send time at the configured rate, and for the last answer.
 */

#include "mme_sim.h"

#include <inttypes.h>
#include <stdlib.h>
#include <strings.h>

/* Between the connect hook and STATE_OPEN: freeDiameter changes the state right after the
 * hook returns, so the first or second look normally sees it. */
#define OPEN_STATE_POLL_US 1000u

static struct sim_config config;

static struct {
	pthread_mutex_t lock;
	pthread_cond_t changed; /* on CLOCK_MONOTONIC */
	struct peer_hdr *eir_peer;  /* set by the connect hook */
	uint64_t outstanding;       /* sent, not completed yet */
	uint64_t completed;         /* answered, timed out, dropped or not sent */
	int stopping;               /* freeDiameterd is shutting down: give up */
} flow = { .lock = PTHREAD_MUTEX_INITIALIZER };

static pthread_t sender;
static int sender_started;
static struct fd_hook_hdl *connect_hook, *drop_hook;

/* One ECR in flight; freed by whichever of the answer or the timeout callback runs. */
struct pending_request {
	uint64_t seq;
	const struct terminal_row *row;
	uint64_t sent_us;
};

/* --- flow control ------------------------------------------------------------------------- */

/* Wait on flow.changed until `deadline_us` (monotonic) or a signal; flow.lock held. */
static void flow_wait_until(uint64_t deadline_us)
{
	struct timespec deadline = {
		.tv_sec = (time_t)(deadline_us / 1000000u),
		.tv_nsec = (long)(deadline_us % 1000000u) * 1000,
	};
	pthread_cond_timedwait(&flow.changed, &flow.lock, &deadline);
}

static void request_completed(void)
{
	pthread_mutex_lock(&flow.lock);
	flow.outstanding--;
	flow.completed++;
	pthread_cond_broadcast(&flow.changed);
	pthread_mutex_unlock(&flow.lock);
}

/* --- the ECR ------------------------------------------------------------------------------ */

static int add_avp(msg_or_avp *parent, struct dict_object *model, const union avp_value *value,
		   struct avp **added)
{
	struct avp *avp = NULL;

	CHECK_FCT(fd_msg_avp_new(model, 0, &avp));
	if (value != NULL)
		CHECK_FCT(fd_msg_avp_setvalue(avp, (union avp_value *)value));
	CHECK_FCT(fd_msg_avp_add(parent, MSG_BRW_LAST_CHILD, avp));
	if (added != NULL)
		*added = avp;
	return 0;
}

static int add_string(msg_or_avp *parent, struct dict_object *model, const char *text)
{
	union avp_value value;
	value.os.data = (uint8_t *)text;
	value.os.len = strlen(text);
	return add_avp(parent, model, &value, NULL); /* setvalue copies the bytes */
}

static int add_u32(msg_or_avp *parent, struct dict_object *model, uint32_t number)
{
	union avp_value value;
	value.u32 = number;
	return add_avp(parent, model, &value, NULL);
}

static int add_i32(msg_or_avp *parent, struct dict_object *model, int32_t number)
{
	union avp_value value;
	value.i32 = number;
	return add_avp(parent, model, &value, NULL);
}

/* ECR as 29.272 §7.2.19 orders it. S13 names its application in a
 * Vendor-Specific-Application-Id (Vendor-Id 3GPP, Auth-Application-Id S13), as Open5GS's MME
 * and the other 3GPP interfaces on Diameter do; a bare Auth-Application-Id is not in the
 * grammar. Auth-Session-State is NO_STATE_MAINTAINED (1): S13 keeps no session state. */
static int build_ecr(const struct terminal_row *row, struct msg **built)
{
	static const char session_suffix[] = MME_SIM_NAME;
	struct msg *request = NULL;
	struct avp *group = NULL;

	CHECK_FCT(fd_msg_new(s13.ecr, MSGFL_ALLOC_ETEID, &request));
	*built = request; /* from here on the caller frees it on failure */
	CHECK_FCT(fd_msg_new_session(request, (os0_t)session_suffix, sizeof(session_suffix) - 1));

	CHECK_FCT(add_avp(request, s13.vendor_specific_application_id, NULL, &group));
	CHECK_FCT(add_u32(group, s13.vendor_id, VENDOR_3GPP));
	CHECK_FCT(add_u32(group, s13.auth_application_id, S13_APPLICATION_ID));

	CHECK_FCT(add_i32(request, s13.auth_session_state, ACV_ASS_NO_STATE_MAINTAINED));
	CHECK_FCT(fd_msg_add_origin(request, 0));
	if (config.destination_host != NULL)
		CHECK_FCT(add_string(request, s13.destination_host, config.destination_host));
	CHECK_FCT(add_string(request, s13.destination_realm, config.destination_realm));

	CHECK_FCT(add_avp(request, s13.terminal_information, NULL, &group));
	CHECK_FCT(add_string(group, s13.imei, row->imei));
	if (row->software_version != NULL)
		CHECK_FCT(add_string(group, s13.software_version, row->software_version));

	if (row->imsi != NULL)
		CHECK_FCT(add_string(request, s13.user_name, row->imsi));
	return 0;
}

/* --- answers ------------------------------------------------------------------------------ */

/* AVP iteration that ends with NULL on error as well as at the end. */
static struct avp *first_child(msg_or_avp *parent)
{
	struct avp *child = NULL;
	return fd_msg_browse(parent, MSG_BRW_FIRST_CHILD, &child, NULL) == 0 ? child : NULL;
}

static struct avp *next_sibling(struct avp *avp)
{
	struct avp *next = NULL;
	return fd_msg_browse(avp, MSG_BRW_NEXT, &next, NULL) == 0 ? next : NULL;
}

static int64_t unsigned_value(struct avp_hdr *header)
{
	return header->avp_value != NULL ? (int64_t)header->avp_value->u32 : -1;
}

static void read_experimental_result(struct avp *group, struct answer_summary *summary)
{
	for (struct avp *child = first_child(group); child != NULL; child = next_sibling(child)) {
		struct avp_hdr *header;
		if (fd_msg_avp_hdr(child, &header) != 0 || (header->avp_flags & AVP_FLAG_VENDOR))
			continue;
		if (header->avp_code == AC_VENDOR_ID)
			summary->experimental_vendor_id = unsigned_value(header);
		else if (header->avp_code == AC_EXPERIMENTAL_RESULT_CODE)
			summary->experimental_result_code = unsigned_value(header);
	}
}

/* The AVPs we report. freeDiameter has parsed the answer against the dictionary (and checked
 * the ECA rules) before calling us; we match by code and vendor rather than by dictionary
 * object so that it does not matter which extension defined an AVP. */
static void read_answer(struct msg *answer, struct answer_summary *summary)
{
	summary->result_code = summary->experimental_result_code = -1;
	summary->experimental_vendor_id = summary->equipment_status = -1;
	for (struct avp *avp = first_child(answer); avp != NULL; avp = next_sibling(avp)) {
		struct avp_hdr *header;
		if (fd_msg_avp_hdr(avp, &header) != 0)
			continue;
		if (!(header->avp_flags & AVP_FLAG_VENDOR)) {
			if (header->avp_code == AC_RESULT_CODE)
				summary->result_code = unsigned_value(header);
			else if (header->avp_code == AC_EXPERIMENTAL_RESULT)
				read_experimental_result(avp, summary);
		} else if (header->avp_vendor == VENDOR_3GPP && header->avp_code == AC_EQUIPMENT_STATUS) {
			summary->equipment_status =
				header->avp_value != NULL ? header->avp_value->i32 : -1;
		}
	}
}

static void on_answer(void *data, struct msg **answer)
{
	struct pending_request *pending = data;
	struct answer_summary summary;
	uint64_t latency_us = monotonic_us() - pending->sent_us;

	read_answer(*answer, &summary);
	report_answer(pending->seq, pending->row, &summary, latency_us);
	fd_msg_free(*answer);
	*answer = NULL; /* handled: not passed on to the dispatch callbacks */
	free(pending);
	request_completed();
}

static void on_timeout(void *data, DiamId_t sent_to, size_t sent_to_length, struct msg **request)
{
	struct pending_request *pending = data;
	(void)sent_to;
	(void)sent_to_length;
	(void)request; /* freeDiameter frees it after we return */
	report_timeout(pending->seq, pending->row, monotonic_us() - pending->sent_us);
	free(pending);
	request_completed();
}

/* freeDiameter drops an answer that breaks the dictionary rules (for an ECA: the 29.272
 * grammar dict.c gives it) without calling on_answer, and it has already taken the request
 * off the peer's list, so no timeout would come either: without this hook the run would wait
 * for that answer forever. The dropped answer still points at its request, and the request
 * at our callback and its data. */
static void on_message_dropped(enum fd_hook_type type, struct msg *msg, struct peer_hdr *peer,
			       void *other, struct fd_hook_permsgdata *pmd, void *regdata)
{
	struct msg_hdr *header = NULL;
	struct msg *request = NULL;
	void (*answer_callback)(void *, struct msg **) = NULL;
	struct pending_request *pending = NULL;
	(void)type, (void)peer, (void)pmd, (void)regdata;

	if (msg == NULL || fd_msg_hdr(msg, &header) != 0 || (header->msg_flags & CMD_FLAG_REQUEST))
		return;
	if (fd_msg_answ_getq(msg, &request) != 0 || request == NULL ||
	    fd_msg_anscb_get(request, &answer_callback, NULL, (void **)&pending) != 0 ||
	    answer_callback != on_answer || pending == NULL)
		return; /* not the answer to one of our ECRs */
	fd_msg_anscb_reset(request, 1, 1); /* nobody calls back with `pending` after this */
	LOG_E(MME_SIM_NAME ": answer to ECR %" PRIu64 " (%s line %u) dropped: %s", pending->seq,
	      config.csv_path, pending->row->csv_line, other ? (char *)other : "no reason given");
	report_dropped(pending->seq, pending->row, monotonic_us() - pending->sent_us);
	free(pending);
	request_completed();
}

/* --- sending ------------------------------------------------------------------------------ */

static void send_ecr(uint64_t seq, const struct terminal_row *row)
{
	struct pending_request *pending = malloc(sizeof(*pending));
	struct msg *request = NULL;
	struct timespec deadline;
	uint64_t sent_us;
	int ret = pending == NULL ? ENOMEM : build_ecr(row, &request);

	if (ret == 0) {
		pending->seq = seq;
		pending->row = row;
		clock_gettime(CLOCK_REALTIME, &deadline); /* fd_msg_send_timeout wants wall time */
		deadline.tv_sec += config.answer_timeout_ms / 1000;
		deadline.tv_nsec += (long)(config.answer_timeout_ms % 1000) * 1000000;
		if (deadline.tv_nsec >= 1000000000) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000;
		}
		pending->sent_us = sent_us = monotonic_us();
		/* Once queued, the answer or the timeout callback owns `pending`. */
		ret = fd_msg_send_timeout(&request, on_answer, pending, on_timeout, &deadline);
		if (ret == 0) {
			report_sent(sent_us);
			return;
		}
	}
	if (request != NULL)
		fd_msg_free(request);
	free(pending);
	LOG_E(MME_SIM_NAME ": ECR %" PRIu64 " (%s line %u) not sent: %s", seq, config.csv_path,
	      row->csv_line, strerror(ret));
	report_unsent(seq, row, ret);
	request_completed();
}

/* Until the EIR peer is open (returns 0), peer_wait_s have passed since start-up, or
 * freeDiameterd stops. */
static int wait_for_eir_peer(uint64_t give_up_us)
{
	struct peer_hdr *peer = NULL;

	for (;;) {
		uint64_t now_us;

		pthread_mutex_lock(&flow.lock);
		if (flow.stopping) {
			pthread_mutex_unlock(&flow.lock);
			return ECANCELED;
		}
		peer = flow.eir_peer;
		pthread_mutex_unlock(&flow.lock);
		/* Read outside flow.lock: the hook may run with the peer's own lock held. */
		if (peer != NULL && fd_peer_get_state(peer) == STATE_OPEN)
			break;
		now_us = monotonic_us();
		if (now_us >= give_up_us) {
			if (config.destination_host != NULL)
				LOG_E(MME_SIM_NAME ": peer %s was not open within peer_wait_s = %u s: "
				      "nothing sent", config.destination_host, config.peer_wait_s);
			else
				LOG_E(MME_SIM_NAME ": no peer was open within peer_wait_s = %u s: "
				      "nothing sent", config.peer_wait_s);
			return ETIMEDOUT;
		}
		pthread_mutex_lock(&flow.lock);
		if (flow.eir_peer == NULL && !flow.stopping) {
			flow_wait_until(give_up_us); /* the connect hook wakes us */
		} else if (!flow.stopping) {
			/* The hook runs just before freeDiameter marks the peer OPEN, and it routes
			 * only to open peers; no event follows, so look again shortly. */
			flow_wait_until(now_us + OPEN_STATE_POLL_US < give_up_us
						? now_us + OPEN_STATE_POLL_US : give_up_us);
		}
		pthread_mutex_unlock(&flow.lock);
	}
	LOG_N(MME_SIM_NAME ": peer %s is open: sending %" PRIu64 " ECRs (%s, window %u)",
	      peer->info.pi_diamid, config.count,
	      config.rate > 0 ? "at the configured rate" : "as fast as the window allows",
	      config.window);
	return 0;
}

/* Request i goes out at start + i/rate (or as soon as the window allows when behind: an
 * open-loop schedule, so that a slow answer does not lower the offered rate), and never with
 * `window` requests already unanswered. */
static void send_all(void)
{
	uint64_t start_us = monotonic_us();

	for (uint64_t i = 0; i < config.count; i++) {
		pthread_mutex_lock(&flow.lock);
		while (!flow.stopping && flow.outstanding >= config.window)
			pthread_cond_wait(&flow.changed, &flow.lock);
		if (config.rate > 0) {
			uint64_t due_us = start_us + (uint64_t)((double)i * 1e6 / config.rate);
			while (!flow.stopping && monotonic_us() < due_us)
				flow_wait_until(due_us);
		}
		if (flow.stopping) {
			pthread_mutex_unlock(&flow.lock);
			return;
		}
		flow.outstanding++;
		pthread_mutex_unlock(&flow.lock);
		send_ecr(i + 1, &config.rows[i % config.row_count]);
	}
}

static void wait_for_all_answers(void)
{
	pthread_mutex_lock(&flow.lock);
	while (!flow.stopping && flow.completed < config.count)
		pthread_cond_wait(&flow.changed, &flow.lock);
	pthread_mutex_unlock(&flow.lock);
}

static void *sender_main(void *unused)
{
	enum run_outcome outcome = RUN_NO_PEER;
	uint64_t give_up_us = monotonic_us() + (uint64_t)config.peer_wait_s * 1000000u;
	(void)unused;

	fd_log_threadname(MME_SIM_NAME " sender");
	if (wait_for_eir_peer(give_up_us) == 0) {
		send_all();
		wait_for_all_answers();
		outcome = RUN_COMPLETE;
	}
	pthread_mutex_lock(&flow.lock);
	if (flow.stopping && flow.completed < config.count)
		outcome = RUN_INTERRUPTED;
	pthread_mutex_unlock(&flow.lock);
	report_summary(&config, outcome);
	if (outcome != RUN_INTERRUPTED) {
		/* The run is over: stop freeDiameterd (DPR to the EIR, then exit) so that a run
		 * ends by itself. */
		LOG_N(MME_SIM_NAME ": done, shutting freeDiameterd down");
		fd_core_shutdown();
	}
	return NULL;
}

/* --- freeDiameter hooks and entry points -------------------------------------------------- */

static void on_peer_connected(enum fd_hook_type type, struct msg *msg, struct peer_hdr *peer,
			      void *other, struct fd_hook_permsgdata *pmd, void *regdata)
{
	(void)type, (void)msg, (void)other, (void)pmd, (void)regdata;
	if (peer == NULL)
		return;
	if (config.destination_host != NULL &&
	    strcasecmp(peer->info.pi_diamid, config.destination_host) != 0)
		return; /* another peer: not the EIR we were told to test */
	pthread_mutex_lock(&flow.lock);
	if (flow.eir_peer == NULL) {
		flow.eir_peer = peer;
		pthread_cond_broadcast(&flow.changed);
	}
	pthread_mutex_unlock(&flow.lock);
}

static int mme_sim_entry(char *config_file)
{
	pthread_condattr_t monotonic;

	CHECK_FCT(sim_config_load(config_file, &config));
	CHECK_FCT(report_open(config.output_path));
	CHECK_FCT(s13_dict_init());

	/* Advertise S13 (auth, vendor 3GPP) in our CER: an EIR answers 5010
	 * NO_COMMON_APPLICATION to a peer without it. */
	CHECK_FCT(fd_disp_app_support(s13.application, s13.vendor_3gpp, 1, 0));

	CHECK_POSIX(pthread_condattr_init(&monotonic));
	CHECK_POSIX(pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC));
	CHECK_POSIX(pthread_cond_init(&flow.changed, &monotonic));
	pthread_condattr_destroy(&monotonic);

	CHECK_FCT(fd_hook_register(HOOK_MASK(HOOK_PEER_CONNECT_SUCCESS), on_peer_connected, NULL,
				   NULL, &connect_hook));
	CHECK_FCT(fd_hook_register(HOOK_MASK(HOOK_MESSAGE_DROPPED), on_message_dropped, NULL, NULL,
				   &drop_hook));
	CHECK_POSIX(pthread_create(&sender, NULL, sender_main, NULL));
	sender_started = 1;
	LOG_N(MME_SIM_NAME ": %zu rows from %s; %" PRIu64 " ECRs to realm %s%s%s; answers to %s",
	      config.row_count, config.csv_path, config.count, config.destination_realm,
	      config.destination_host ? ", host " : "",
	      config.destination_host ? config.destination_host : "", config.output_path);
	return 0;
}

/* Called by freeDiameterd at shutdown, after its peers and dispatch threads have stopped (no
 * callback of ours runs any more), whether we asked for the shutdown or a signal did. */
void fd_ext_fini(void)
{
	if (sender_started) {
		pthread_mutex_lock(&flow.lock);
		flow.stopping = 1;
		pthread_cond_broadcast(&flow.changed);
		pthread_mutex_unlock(&flow.lock);
		pthread_join(sender, NULL);
	}
	if (connect_hook != NULL)
		fd_hook_unregister(connect_hook);
	if (drop_hook != NULL)
		fd_hook_unregister(drop_hook);
	report_close();
	/* Requests still pending point into config.rows; freeDiameter will not call back now. */
	sim_config_free(&config);
}

EXTENSION_ENTRY(MME_SIM_NAME, mme_sim_entry);
