/* mme_sim: an MME stand-in for S13 (3GPP TS 29.272), as a freeDiameter extension.
 *
 * freeDiameterd loads it with `LoadExtension = "mme_sim.fdx" : "mme_sim.conf";`. Once the EIR
 * peer is open it sends ME-Identity-Check-Requests (ECR) built from the rows of a CSV at a
 * configured rate, writes one line per answer to its own log, then a summary line, and shuts
 * freeDiameterd down.
 *
 * Files: config.c (its configuration file and the CSV), dict.c (S13 in freeDiameter's
 * dictionary), report.c (the output log and the counters), mme_sim.c (entry point, peer
 * watching, the sending loop and the answer callbacks).
 */

#ifndef MME_SIM_H
#define MME_SIM_H

#include <freeDiameter/extension.h>

#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define MME_SIM_NAME "mme_sim"

/* TS 29.272 §7.3, §7.4 */
#define S13_APPLICATION_ID 16777252u
#define VENDOR_3GPP 10415u
#define ME_IDENTITY_CHECK_CODE 324u
#define DIAMETER_SUCCESS 2001u
#define DIAMETER_ERROR_EQUIPMENT_UNKNOWN 5422u /* Experimental-Result-Code, vendor 3GPP */

/* AVP codes that freeDiameter's AC_* constants (libfdproto.h) lack. */
#define AC_AUTH_SESSION_STATE 277
#define AC_EXPERIMENTAL_RESULT 297
#define AC_EXPERIMENTAL_RESULT_CODE 298
#define AC_TERMINAL_INFORMATION 1401 /* these four: vendor 3GPP */
#define AC_IMEI 1402
#define AC_SOFTWARE_VERSION 1403
#define AC_EQUIPMENT_STATUS 1445
#define ACV_ASS_NO_STATE_MAINTAINED 1 /* Auth-Session-State */

/* One `imei,imsi[,software_version]` row of the CSV. */
struct terminal_row {
	char *imei;             /* sent as is: invalid IMEIs may be sent on purpose */
	char *imsi;             /* NULL: no User-Name AVP */
	char *software_version; /* NULL: no Software-Version AVP */
	unsigned csv_line;      /* for the output log, so that an answer points at its row */
};

struct sim_config {
	char *config_path;
	char *csv_path;
	char *output_path;
	char *destination_realm;
	char *destination_host; /* NULL: no Destination-Host; wait for whichever peer opens first */
	double rate;            /* ECR/s; 0 = as fast as the window allows */
	unsigned window;        /* at most this many ECRs awaiting an answer */
	uint64_t count;         /* ECRs to send in all, cycling through the rows */
	unsigned answer_timeout_ms;
	unsigned peer_wait_s;   /* give up when no EIR peer is open this long after start-up */
	struct terminal_row *rows;
	size_t row_count;
};

/* config.c */
int sim_config_load(const char *path, struct sim_config *config);
void sim_config_free(struct sim_config *config);

/* dict.c: the dictionary objects the sender and the answer callback use. */
struct s13_dict {
	struct dict_object *vendor_3gpp;
	struct dict_object *application;
	struct dict_object *ecr;
	struct dict_object *eca;
	struct dict_object *session_id;
	struct dict_object *auth_session_state;
	struct dict_object *vendor_specific_application_id;
	struct dict_object *vendor_id;
	struct dict_object *auth_application_id;
	struct dict_object *destination_host;
	struct dict_object *destination_realm;
	struct dict_object *user_name;
	struct dict_object *terminal_information;
	struct dict_object *imei;
	struct dict_object *software_version;
	struct dict_object *result_code;
	struct dict_object *experimental_result;
	struct dict_object *experimental_result_code;
	struct dict_object *equipment_status;
};
extern struct s13_dict s13;
int s13_dict_init(void);

/* report.c: what one answer said. */
struct answer_summary {
	int64_t result_code;              /* -1: absent */
	int64_t experimental_result_code; /* -1: absent */
	int64_t experimental_vendor_id;   /* -1: absent */
	int64_t equipment_status;         /* -1: absent */
};

int report_open(const char *path);
void report_answer(uint64_t seq, const struct terminal_row *row,
		   const struct answer_summary *answer, uint64_t latency_us);
void report_timeout(uint64_t seq, const struct terminal_row *row, uint64_t waited_us);
void report_dropped(uint64_t seq, const struct terminal_row *row, uint64_t latency_us);
void report_unsent(uint64_t seq, const struct terminal_row *row, int error);
void report_sent(uint64_t sent_us);
/* How a run ended. */
enum run_outcome {
	RUN_COMPLETE,    /* every ECR sent, and answered or timed out */
	RUN_NO_PEER,     /* the EIR peer never opened within peer_wait_s */
	RUN_INTERRUPTED, /* freeDiameterd was stopped (a signal) before the end */
};
void report_summary(const struct sim_config *config, enum run_outcome outcome);
void report_close(void);

/* Monotonic time in microseconds: latencies must not jump with the wall clock. */
uint64_t monotonic_us(void);

#endif /* MME_SIM_H */
