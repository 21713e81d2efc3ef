/* The output log: one line per answer (or timeout), then one summary line; and the counters
 * behind the summary.
 *
 * Lines are `kind key=value ...` with every key always present (`-` when absent), so that a
 * test or `awk` can read them without a parser:
 *
 *   answer seq=3 csv_line=5 imei=35209900176148 imsi=- result_code=2001
 *          experimental_result_code=- equipment_status=BLACKLISTED latency_us=412
 *   timeout seq=9 csv_line=4 imei=... imsi=... latency_us=5000081
 *   dropped seq=7 csv_line=2 imei=... imsi=... latency_us=388  (an ECA that broke the grammar)
 *   unsent seq=10 csv_line=5 imei=... imsi=... error=12
 *   summary planned=... sent=... answered=... errors=... ... outcome=complete
 *
 * Answers arrive on freeDiameter's dispatch threads and timeouts on its timer thread, so one
 * mutex guards the file and the counters.
 */

#include "mme_sim.h"

#include <inttypes.h>

static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *output;

static struct {
	uint64_t sent;
	uint64_t answered;
	uint64_t errors; /* answers that are no verdict, timeouts, dropped and unsent */
	uint64_t timeouts;
	uint64_t dropped; /* answers freeDiameter refused (dictionary rules): no verdict */
	uint64_t unsent;
	uint64_t by_status[3]; /* WHITELISTED, BLACKLISTED, GREYLISTED */
	uint64_t equipment_unknown;
	uint64_t latency_sum_us, latency_min_us, latency_max_us;
	uint64_t first_send_us, last_completion_us;
} stats;

static const char *const status_names[] = { "WHITELISTED", "BLACKLISTED", "GREYLISTED" };

uint64_t monotonic_us(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
}

int report_open(const char *path)
{
	output = fopen(path, "w");
	if (output == NULL) {
		int error = errno;
		LOG_E(MME_SIM_NAME ": output: cannot write %s: %s", path, strerror(error));
		return error;
	}
	/* Fully buffered: at thousands of answers a second a write per line would cost more
	 * than the request. The file is complete once the summary line is in it. */
	setvbuf(output, NULL, _IOFBF, 1 << 16);
	memset(&stats, 0, sizeof(stats));
	stats.latency_min_us = UINT64_MAX;
	return 0;
}

/* An ECR queued for sending at `sent_us`. Its answer may already have been reported: only
 * the sum matters. */
void report_sent(uint64_t sent_us)
{
	pthread_mutex_lock(&report_lock);
	if (stats.first_send_us == 0 || sent_us < stats.first_send_us)
		stats.first_send_us = sent_us;
	stats.sent++;
	pthread_mutex_unlock(&report_lock);
}

static void print_value(const char *key, int64_t value)
{
	if (value < 0)
		fprintf(output, " %s=-", key);
	else
		fprintf(output, " %s=%" PRId64, key, value);
}

static void print_row(const char *kind, uint64_t seq, const struct terminal_row *row)
{
	fprintf(output, "%s seq=%" PRIu64 " csv_line=%u imei=%s imsi=%s", kind, seq, row->csv_line,
		row->imei, row->imsi ? row->imsi : "-");
}

/* A verdict: Result-Code 2001 with an Equipment-Status, or Experimental-Result 5422 from 3GPP.
 * Anything else (a protocol or permanent error, a missing status) counts as an error. */
static int is_verdict(const struct answer_summary *answer)
{
	if (answer->result_code == DIAMETER_SUCCESS)
		return answer->equipment_status >= 0 && answer->equipment_status <= 2;
	return answer->result_code < 0 &&
	       answer->experimental_result_code == DIAMETER_ERROR_EQUIPMENT_UNKNOWN &&
	       answer->experimental_vendor_id == VENDOR_3GPP;
}

/* Timing of an answer, a timeout or a dropped answer; report_lock held. */
static void count_completion(uint64_t latency_us)
{
	stats.last_completion_us = monotonic_us();
	stats.latency_sum_us += latency_us;
	if (latency_us < stats.latency_min_us)
		stats.latency_min_us = latency_us;
	if (latency_us > stats.latency_max_us)
		stats.latency_max_us = latency_us;
}

void report_answer(uint64_t seq, const struct terminal_row *row,
		   const struct answer_summary *answer, uint64_t latency_us)
{
	int64_t status = answer->equipment_status;

	pthread_mutex_lock(&report_lock);
	if (output != NULL) {
		print_row("answer", seq, row);
		print_value("result_code", answer->result_code);
		print_value("experimental_result_code", answer->experimental_result_code);
		if (status >= 0 && status <= 2)
			fprintf(output, " equipment_status=%s", status_names[status]);
		else
			print_value("equipment_status", status); /* absent, or a value 29.272 lacks */
		fprintf(output, " latency_us=%" PRIu64 "\n", latency_us);
	}
	stats.answered++;
	if (!is_verdict(answer))
		stats.errors++;
	else if (answer->result_code == DIAMETER_SUCCESS)
		stats.by_status[status]++;
	else
		stats.equipment_unknown++;
	count_completion(latency_us);
	pthread_mutex_unlock(&report_lock);
}

void report_timeout(uint64_t seq, const struct terminal_row *row, uint64_t waited_us)
{
	pthread_mutex_lock(&report_lock);
	if (output != NULL) {
		print_row("timeout", seq, row);
		fprintf(output, " latency_us=%" PRIu64 "\n", waited_us);
	}
	stats.timeouts++;
	stats.errors++;
	count_completion(waited_us);
	pthread_mutex_unlock(&report_lock);
}

void report_dropped(uint64_t seq, const struct terminal_row *row, uint64_t latency_us)
{
	pthread_mutex_lock(&report_lock);
	if (output != NULL) {
		print_row("dropped", seq, row);
		fprintf(output, " latency_us=%" PRIu64 "\n", latency_us);
	}
	stats.dropped++;
	stats.errors++;
	count_completion(latency_us);
	pthread_mutex_unlock(&report_lock);
}

void report_unsent(uint64_t seq, const struct terminal_row *row, int error)
{
	pthread_mutex_lock(&report_lock);
	if (output != NULL) {
		print_row("unsent", seq, row);
		fprintf(output, " error=%d\n", error);
	}
	stats.unsent++;
	stats.errors++;
	stats.last_completion_us = monotonic_us();
	pthread_mutex_unlock(&report_lock);
}

/* The summary goes to the output file and to freeDiameterd's log (where a test waits for it),
 * in that order, so that the file is complete by the time the log line appears. */
void report_summary(const struct sim_config *config, enum run_outcome outcome)
{
	static const char *const outcome_names[] = {
		[RUN_COMPLETE] = "complete", [RUN_NO_PEER] = "no_peer",
		[RUN_INTERRUPTED] = "interrupted",
	};
	char line[512];
	double elapsed_s, rate;
	uint64_t completed;

	pthread_mutex_lock(&report_lock);
	completed = stats.answered + stats.timeouts + stats.dropped;
	elapsed_s = stats.last_completion_us > stats.first_send_us
			    ? (double)(stats.last_completion_us - stats.first_send_us) / 1e6
			    : 0.0;
	rate = elapsed_s > 0 ? (double)stats.answered / elapsed_s : 0.0;
	snprintf(line, sizeof(line),
		 "summary planned=%" PRIu64 " sent=%" PRIu64 " answered=%" PRIu64 " errors=%" PRIu64
		 " timeouts=%" PRIu64 " dropped=%" PRIu64 " unsent=%" PRIu64 " whitelisted=%" PRIu64
		 " blacklisted=%" PRIu64 " greylisted=%" PRIu64 " equipment_unknown=%" PRIu64
		 " elapsed_s=%.3f rate_per_s=%.1f target_rate=%.1f window=%u"
		 " latency_us_min=%" PRIu64 " latency_us_avg=%" PRIu64 " latency_us_max=%" PRIu64
		 " outcome=%s",
		 config->count, stats.sent, stats.answered, stats.errors, stats.timeouts,
		 stats.dropped, stats.unsent,
		 stats.by_status[0], stats.by_status[1], stats.by_status[2], stats.equipment_unknown,
		 elapsed_s, rate, config->rate, config->window,
		 completed ? stats.latency_min_us : 0,
		 completed ? stats.latency_sum_us / completed : 0, stats.latency_max_us,
		 outcome_names[outcome]);
	if (output != NULL) {
		fprintf(output, "%s\n", line);
		fflush(output);
	}
	pthread_mutex_unlock(&report_lock);
	LOG_N(MME_SIM_NAME ": %s", line);
}

void report_close(void)
{
	pthread_mutex_lock(&report_lock);
	if (output != NULL)
		fclose(output);
	output = NULL;
	pthread_mutex_unlock(&report_lock);
}
