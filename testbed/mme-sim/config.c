/* The configuration file (`key = value` lines) and the CSV of terminals it names.
 *
 * Every problem is reported as `FILE:LINE: FIELD: problem` and refuses the whole file, so a
 * typo stops freeDiameterd at start-up instead of skewing a load run.
 */

#include "mme_sim.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINE 1024

#define DEFAULT_WINDOW 128
#define DEFAULT_ANSWER_TIMEOUT_MS 5000
#define DEFAULT_PEER_WAIT_S 60

static char *trim(char *text)
{
	char *end;
	while (isspace((unsigned char)*text))
		text++;
	end = text + strlen(text);
	while (end > text && isspace((unsigned char)end[-1]))
		*--end = '\0';
	return text;
}

/* A path from the configuration file is relative to that file's directory, so that a config
 * and its CSV can be moved together and run from anywhere. */
static char *resolve_path(const char *config_path, const char *value)
{
	const char *slash = strrchr(config_path, '/');
	size_t directory_length;
	char *resolved;

	if (value[0] == '/' || slash == NULL)
		return strdup(value);
	directory_length = (size_t)(slash - config_path) + 1;
	resolved = malloc(directory_length + strlen(value) + 1);
	if (resolved == NULL)
		return NULL;
	memcpy(resolved, config_path, directory_length);
	strcpy(resolved + directory_length, value);
	return resolved;
}

static int all_digits(const char *text, size_t min_length, size_t max_length)
{
	size_t length = strlen(text);
	if (length < min_length || length > max_length)
		return 0;
	for (; *text; text++)
		if (!isdigit((unsigned char)*text))
			return 0;
	return 1;
}

/* The IMEI is sent as is (the EIR must answer 5004 to a malformed one, and that is worth
 * testing), but it goes into our `key=value` log lines, so nothing that would break them. */
static const char *imei_problem(const char *imei)
{
	if (*imei == '\0')
		return "empty";
	if (strlen(imei) > 32)
		return "longer than 32 characters";
	for (; *imei; imei++)
		if (!isgraph((unsigned char)*imei) || *imei == '=')
			return "contains a space, a control character or '='";
	return NULL;
}

static int parse_unsigned(const char *text, uint64_t min, uint64_t max, uint64_t *value)
{
	char *end;
	unsigned long long parsed;

	if (!isdigit((unsigned char)*text))
		return EINVAL;
	errno = 0;
	parsed = strtoull(text, &end, 10);
	if (errno != 0 || *end != '\0' || parsed < min || parsed > max)
		return EINVAL;
	*value = parsed;
	return 0;
}

/* Split `line` at commas in place; returns the number of fields (at most max_fields + 1, so
 * that a caller can tell "too many"). */
static size_t split_csv(char *line, char **fields, size_t max_fields)
{
	size_t count = 0;
	char *cursor = line;

	for (;;) {
		char *comma = strchr(cursor, ',');
		if (count <= max_fields)
			fields[count] = cursor;
		count++;
		if (comma == NULL)
			break;
		*comma = '\0';
		cursor = comma + 1;
	}
	for (size_t i = 0; i < count && i <= max_fields; i++)
		fields[i] = trim(fields[i]);
	return count;
}

static char *optional_copy(const char *text)
{
	return *text ? strdup(text) : NULL;
}

static int add_row(struct sim_config *config, size_t *capacity, char **fields, size_t field_count,
		   unsigned line_number)
{
	struct terminal_row *row;

	if (config->row_count == *capacity) {
		size_t bigger = *capacity ? *capacity * 2 : 64;
		struct terminal_row *grown = realloc(config->rows, bigger * sizeof(*grown));
		if (grown == NULL)
			return ENOMEM;
		config->rows = grown;
		*capacity = bigger;
	}
	row = &config->rows[config->row_count];
	memset(row, 0, sizeof(*row));
	row->csv_line = line_number;
	row->imei = strdup(fields[0]);
	row->imsi = field_count > 1 ? optional_copy(fields[1]) : NULL;
	row->software_version = field_count > 2 ? optional_copy(fields[2]) : NULL;
	if (row->imei == NULL)
		return ENOMEM;
	config->row_count++;
	return 0;
}

/* Rows `imei,imsi[,software_version]`; an optional header row (first field "imei"); blank
 * lines and lines starting with '#' are skipped. */
static int load_csv(struct sim_config *config)
{
	FILE *file = fopen(config->csv_path, "r");
	char buffer[MAX_LINE + 2];
	unsigned line_number = 0;
	size_t capacity = 0;
	int problems = 0;

	if (file == NULL) {
		LOG_E(MME_SIM_NAME ": %s: csv: cannot open %s: %s", config->config_path,
		      config->csv_path, strerror(errno));
		return errno ? errno : EINVAL;
	}
	while (fgets(buffer, sizeof(buffer), file) != NULL) {
		char *fields[4];
		size_t field_count;
		const char *problem;
		char *line;

		line_number++;
		if (strchr(buffer, '\n') == NULL && !feof(file)) {
			LOG_E(MME_SIM_NAME ": %s:%u: row: longer than %d characters", config->csv_path,
			      line_number, MAX_LINE);
			problems++;
			break; /* the rest of this line would be read as the next one */
		}
		line = trim(buffer);
		if (*line == '\0' || *line == '#')
			continue;
		field_count = split_csv(line, fields, 3);
		if (config->row_count == 0 && strcmp(fields[0], "imei") == 0)
			continue; /* header */
		if (field_count > 3) {
			LOG_E(MME_SIM_NAME ": %s:%u: row: %zu fields, expected imei,imsi[,software_version]",
			      config->csv_path, line_number, field_count);
			problems++;
			continue;
		}
		if ((problem = imei_problem(fields[0])) != NULL) {
			LOG_E(MME_SIM_NAME ": %s:%u: imei: %s", config->csv_path, line_number, problem);
			problems++;
			continue;
		}
		if (field_count > 1 && *fields[1] && !all_digits(fields[1], 5, 15)) {
			LOG_E(MME_SIM_NAME ": %s:%u: imsi: '%s' is not 5 to 15 digits", config->csv_path,
			      line_number, fields[1]);
			problems++;
			continue;
		}
		if (field_count > 2 && *fields[2] && !all_digits(fields[2], 2, 2)) {
			LOG_E(MME_SIM_NAME ": %s:%u: software_version: '%s' is not 2 digits",
			      config->csv_path, line_number, fields[2]);
			problems++;
			continue;
		}
		if (add_row(config, &capacity, fields, field_count, line_number) != 0) {
			fclose(file);
			return ENOMEM;
		}
	}
	fclose(file);
	if (problems)
		return EINVAL;
	if (config->row_count == 0) {
		LOG_E(MME_SIM_NAME ": %s:%u: row: no imei,imsi rows in the file", config->csv_path,
		      line_number);
		return EINVAL;
	}
	return 0;
}

static int set_string(char **slot, const char *value)
{
	free(*slot);
	*slot = strdup(value);
	return *slot ? 0 : ENOMEM;
}

static int set_path(const struct sim_config *config, char **slot, const char *value)
{
	free(*slot);
	*slot = resolve_path(config->config_path, value);
	return *slot ? 0 : ENOMEM;
}

/* One `key = value` line; returns a problem text, or NULL. */
static const char *apply_setting(struct sim_config *config, const char *key, const char *value,
				 int *error)
{
	uint64_t number;

	*error = 0;
	if (strcmp(key, "csv") == 0) {
		*error = set_path(config, &config->csv_path, value);
	} else if (strcmp(key, "output") == 0) {
		*error = set_path(config, &config->output_path, value);
	} else if (strcmp(key, "destination_realm") == 0) {
		*error = set_string(&config->destination_realm, value);
	} else if (strcmp(key, "destination_host") == 0) {
		*error = set_string(&config->destination_host, value);
	} else if (strcmp(key, "rate") == 0) {
		char *end;
		double rate = strtod(value, &end);
		if (*end != '\0' || end == value || !isfinite(rate) || rate < 0 || rate > 1e7)
			return "expected ECR per second, 0 (as fast as the window allows) to 10000000";
		config->rate = rate;
	} else if (strcmp(key, "window") == 0) {
		if (parse_unsigned(value, 1, 100000, &number) != 0)
			return "expected a whole number of outstanding requests, 1 to 100000";
		config->window = (unsigned)number;
	} else if (strcmp(key, "count") == 0) {
		if (parse_unsigned(value, 1, UINT64_MAX / 2, &number) != 0)
			return "expected a whole number of ECRs, at least 1";
		config->count = number;
	} else if (strcmp(key, "answer_timeout_ms") == 0) {
		if (parse_unsigned(value, 1, 3600000, &number) != 0)
			return "expected milliseconds, 1 to 3600000";
		config->answer_timeout_ms = (unsigned)number;
	} else if (strcmp(key, "peer_wait_s") == 0) {
		if (parse_unsigned(value, 1, 86400, &number) != 0)
			return "expected seconds, 1 to 86400";
		config->peer_wait_s = (unsigned)number;
	} else {
		return "unknown key (csv, output, destination_realm, destination_host, rate, window, "
		       "count, answer_timeout_ms, peer_wait_s)";
	}
	return NULL;
}

int sim_config_load(const char *path, struct sim_config *config)
{
	FILE *file;
	char buffer[MAX_LINE + 2];
	unsigned line_number = 0;
	int problems = 0;
	int error;

	memset(config, 0, sizeof(*config));
	config->window = DEFAULT_WINDOW;
	config->answer_timeout_ms = DEFAULT_ANSWER_TIMEOUT_MS;
	config->peer_wait_s = DEFAULT_PEER_WAIT_S;
	if (path == NULL || *path == '\0') {
		LOG_E(MME_SIM_NAME ": no configuration file: give one as "
		      "LoadExtension = \"mme_sim.fdx\" : \"mme_sim.conf\";");
		return EINVAL;
	}
	if ((config->config_path = strdup(path)) == NULL)
		return ENOMEM;
	if ((file = fopen(path, "r")) == NULL) {
		LOG_E(MME_SIM_NAME ": %s: cannot open: %s", path, strerror(errno));
		return EINVAL;
	}
	while (fgets(buffer, sizeof(buffer), file) != NULL) {
		char *line, *equals, *key, *value, *comment;
		const char *problem;

		line_number++;
		if ((comment = strchr(buffer, '#')) != NULL)
			*comment = '\0';
		line = trim(buffer);
		if (*line == '\0')
			continue;
		if ((equals = strchr(line, '=')) == NULL) {
			LOG_E(MME_SIM_NAME ": %s:%u: line: expected key = value", path, line_number);
			problems++;
			continue;
		}
		*equals = '\0';
		key = trim(line);
		value = trim(equals + 1);
		if (*value == '\0') {
			LOG_E(MME_SIM_NAME ": %s:%u: %s: no value", path, line_number, key);
			problems++;
			continue;
		}
		problem = apply_setting(config, key, value, &error);
		if (error) {
			fclose(file);
			return error;
		}
		if (problem) {
			LOG_E(MME_SIM_NAME ": %s:%u: %s: '%s': %s", path, line_number, key, value, problem);
			problems++;
		}
	}
	fclose(file);
	if (config->csv_path == NULL) {
		LOG_E(MME_SIM_NAME ": %s: csv: missing (the imei,imsi file to send)", path);
		problems++;
	}
	if (config->output_path == NULL) {
		LOG_E(MME_SIM_NAME ": %s: output: missing (where to write one line per answer)", path);
		problems++;
	}
	if (problems)
		return EINVAL;
	/* Our own realm by default: the MME and the EIR of one operator share it. */
	if (config->destination_realm == NULL &&
	    set_string(&config->destination_realm, fd_g_config->cnf_diamrlm) != 0)
		return ENOMEM;
	if ((error = load_csv(config)) != 0)
		return error;
	if (config->count == 0)
		config->count = config->row_count; /* each row once */
	return 0;
}

void sim_config_free(struct sim_config *config)
{
	for (size_t i = 0; i < config->row_count; i++) {
		free(config->rows[i].imei);
		free(config->rows[i].imsi);
		free(config->rows[i].software_version);
	}
	free(config->rows);
	free(config->config_path);
	free(config->csv_path);
	free(config->output_path);
	free(config->destination_realm);
	free(config->destination_host);
	memset(config, 0, sizeof(*config));
}
