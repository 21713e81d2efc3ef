/* S13 in freeDiameter's dictionary: the application, ME-Identity-Check-Request/Answer and
 * the 3GPP AVPs they carry (TS 29.272 §5.2.4, §7.2.19, §7.2.20, §7.3).
 *
 * Debian's freeDiameter 1.2.1 has no S13 dictionary. dict_dcca_3gpp (when loaded before us)
 * already defines Terminal-Information, IMEI, Software-Version and Equipment-Status, so every
 * object is searched for first and created only when missing: defining an AVP twice with
 * different data is an error, and a later dictionary extension might define S13 properly.
 *
 * The rules given to the commands matter for answers: freeDiameter checks every received
 * answer against them and drops one that breaks them (the request then times out here), so
 * they are the independent check that the EIR's ECA follows the 29.272 grammar.
 */

#include "mme_sim.h"

struct s13_dict s13;

#define DICT (fd_g_config->cnf_dict)

/* An AVP the base dictionary (RFC 6733) must already have. */
struct required_avp {
	struct dict_object **slot;
	avp_code_t code;
	const char *name;
};

/* A 3GPP AVP we define when no loaded dictionary does. */
struct vendor_avp {
	struct dict_object **slot;
	avp_code_t code;
	const char *name;
	enum dict_avp_basetype basetype;
	const char *type_name; /* derived type to attach, or NULL */
};

static struct dict_object *origin_host, *origin_realm, *failed_avp, *proxy_info, *route_record;

static int find_vendor(void)
{
	vendor_id_t id = VENDOR_3GPP;
	struct dict_vendor_data data = { VENDOR_3GPP, "3GPP" };
	int ret = fd_dict_search(DICT, DICT_VENDOR, VENDOR_BY_ID, &id, &s13.vendor_3gpp, ENOENT);

	if (ret == ENOENT)
		ret = fd_dict_new(DICT, DICT_VENDOR, &data, NULL, &s13.vendor_3gpp);
	return ret;
}

static int find_application(void)
{
	application_id_t id = S13_APPLICATION_ID;
	struct dict_application_data data = { S13_APPLICATION_ID, "S13" };
	int ret = fd_dict_search(DICT, DICT_APPLICATION, APPLICATION_BY_ID, &id, &s13.application,
				 ENOENT);

	if (ret == ENOENT)
		ret = fd_dict_new(DICT, DICT_APPLICATION, &data, s13.vendor_3gpp, &s13.application);
	return ret;
}

static int find_base_avps(void)
{
	const struct required_avp avps[] = {
		{ &s13.session_id, AC_SESSION_ID, "Session-Id" },
		{ &s13.auth_session_state, AC_AUTH_SESSION_STATE, "Auth-Session-State" },
		{ &s13.vendor_specific_application_id, AC_VENDOR_SPECIFIC_APPLICATION_ID,
		  "Vendor-Specific-Application-Id" },
		{ &s13.vendor_id, AC_VENDOR_ID, "Vendor-Id" },
		{ &s13.auth_application_id, AC_AUTH_APPLICATION_ID, "Auth-Application-Id" },
		{ &s13.destination_host, AC_DESTINATION_HOST, "Destination-Host" },
		{ &s13.destination_realm, AC_DESTINATION_REALM, "Destination-Realm" },
		{ &s13.user_name, AC_USER_NAME, "User-Name" },
		{ &s13.result_code, AC_RESULT_CODE, "Result-Code" },
		{ &s13.experimental_result, AC_EXPERIMENTAL_RESULT, "Experimental-Result" },
		{ &s13.experimental_result_code, AC_EXPERIMENTAL_RESULT_CODE, "Experimental-Result-Code" },
		{ &origin_host, AC_ORIGIN_HOST, "Origin-Host" },
		{ &origin_realm, AC_ORIGIN_REALM, "Origin-Realm" },
		{ &failed_avp, AC_FAILED_AVP, "Failed-AVP" },
		{ &proxy_info, AC_PROXY_INFO, "Proxy-Info" },
		{ &route_record, AC_ROUTE_RECORD, "Route-Record" },
	};

	for (size_t i = 0; i < sizeof(avps) / sizeof(avps[0]); i++) {
		struct dict_avp_request request = { 0, avps[i].code, NULL };
		int ret = fd_dict_search(DICT, DICT_AVP, AVP_BY_CODE_AND_VENDOR, &request,
					 avps[i].slot, ENOENT);
		if (ret != 0) {
			LOG_E(MME_SIM_NAME ": the base dictionary has no %s (%u): %s", avps[i].name,
			      avps[i].code, strerror(ret));
			return ret;
		}
	}
	return 0;
}

static int find_or_define_vendor_avp(const struct vendor_avp *definition)
{
	struct dict_avp_request request = { VENDOR_3GPP, definition->code, NULL };
	struct dict_avp_data data = {
		definition->code, VENDOR_3GPP, (char *)definition->name,
		AVP_FLAG_VENDOR | AVP_FLAG_MANDATORY, AVP_FLAG_VENDOR | AVP_FLAG_MANDATORY,
		definition->basetype,
	};
	struct dict_object *type = NULL;
	int ret = fd_dict_search(DICT, DICT_AVP, AVP_BY_CODE_AND_VENDOR, &request, definition->slot,
				 ENOENT);

	if (ret != ENOENT)
		return ret;
	if (definition->type_name != NULL) {
		ret = fd_dict_search(DICT, DICT_TYPE, TYPE_BY_NAME, definition->type_name, &type,
				     ENOENT);
		if (ret != 0) {
			LOG_E(MME_SIM_NAME ": no type %s in the dictionary for %s: %s",
			      definition->type_name, definition->name, strerror(ret));
			return ret;
		}
	}
	LOG_N(MME_SIM_NAME ": defining AVP %s (%u, vendor %u)", definition->name, definition->code,
	      VENDOR_3GPP);
	return fd_dict_new(DICT, DICT_AVP, &data, type, definition->slot);
}

/* The name dict_dcca_3gpp gives the type, so that both describe the same thing. */
#define EQUIPMENT_STATUS_TYPE "3GPP/Enumerated(Equipment-Status)"

static int avp_is_defined(avp_code_t code)
{
	struct dict_avp_request request = { VENDOR_3GPP, code, NULL };
	struct dict_object *found = NULL;
	return fd_dict_search(DICT, DICT_AVP, AVP_BY_CODE_AND_VENDOR, &request, &found, ENOENT) == 0;
}

static int define_equipment_status_type(void)
{
	struct dict_type_data data = { .type_base = AVP_TYPE_INTEGER32,
				       .type_name = EQUIPMENT_STATUS_TYPE };
	struct dict_object *type = NULL;
	int ret = fd_dict_search(DICT, DICT_TYPE, TYPE_BY_NAME, EQUIPMENT_STATUS_TYPE, &type, ENOENT);

	if (ret == ENOENT)
		ret = fd_dict_new(DICT, DICT_TYPE, &data, NULL, NULL);
	return ret;
}

/* Names for the Equipment-Status values (29.272 §7.3.51), so that freeDiameter's message
 * dumps (-dd) read WHITELISTED rather than 0. dict_dcca_3gpp gives the AVP an Enumerated type
 * without values; we add them to whichever type the AVP has. */
static int name_equipment_status_values(void)
{
	static const char *names[] = { "WHITELISTED", "BLACKLISTED", "GREYLISTED" };
	struct dict_object *type = NULL;
	int ret = fd_dict_search(DICT, DICT_TYPE, TYPE_OF_AVP, s13.equipment_status, &type, ENOENT);

	if (ret == ENOENT)
		return 0; /* an AVP defined without a type by someone else: dumps show numbers */
	if (ret != 0)
		return ret;
	for (int value = 0; value < 3; value++) {
		struct dict_enumval_request request;
		struct dict_object *existing = NULL;

		memset(&request, 0, sizeof(request));
		request.type_obj = type;
		request.search.enum_value.i32 = value;
		ret = fd_dict_search(DICT, DICT_ENUMVAL, ENUMVAL_BY_STRUCT, &request, &existing, ENOENT);
		if (ret == ENOENT) {
			struct dict_enumval_data data;
			memset(&data, 0, sizeof(data));
			data.enum_name = (char *)names[value];
			data.enum_value.i32 = value;
			ret = fd_dict_new(DICT, DICT_ENUMVAL, &data, type, NULL);
		}
		if (ret != 0)
			return ret;
	}
	return 0;
}

static int define_3gpp_avps(void)
{
	/* Grouped AVP rules belong to whoever defined the group: dict_dcca_3gpp's
	 * Terminal-Information has none (any content parses); we add ours only to our own. */
	int terminal_information_is_ours = !avp_is_defined(AC_TERMINAL_INFORMATION);
	const struct vendor_avp avps[] = {
		{ &s13.terminal_information, AC_TERMINAL_INFORMATION, "Terminal-Information",
		  AVP_TYPE_GROUPED, NULL },
		{ &s13.imei, AC_IMEI, "IMEI", AVP_TYPE_OCTETSTRING, "UTF8String" },
		{ &s13.software_version, AC_SOFTWARE_VERSION, "Software-Version", AVP_TYPE_OCTETSTRING,
		  "UTF8String" },
		{ &s13.equipment_status, AC_EQUIPMENT_STATUS, "Equipment-Status", AVP_TYPE_INTEGER32,
		  EQUIPMENT_STATUS_TYPE },
	};

	if (!avp_is_defined(AC_EQUIPMENT_STATUS))
		CHECK_FCT(define_equipment_status_type());
	for (size_t i = 0; i < sizeof(avps) / sizeof(avps[0]); i++)
		CHECK_FCT(find_or_define_vendor_avp(&avps[i]));
	if (terminal_information_is_ours) {
		struct dict_rule_data rule = { NULL, RULE_OPTIONAL, 0, 0, 1 };
		rule.rule_avp = s13.imei;
		CHECK_FCT(fd_dict_new(DICT, DICT_RULE, &rule, s13.terminal_information, NULL));
		rule.rule_avp = s13.software_version;
		CHECK_FCT(fd_dict_new(DICT, DICT_RULE, &rule, s13.terminal_information, NULL));
	}
	return name_equipment_status_values();
}

/* Which AVPs may or must appear in the ECR and the ECA (29.272 §7.2.19, §7.2.20). DRMP
 * (RFC 7944) is left out: freeDiameter 1.2.1's base dictionary does not know it. */
struct command_rule {
	struct dict_object **avp;
	enum rule_position position;
	int max;          /* -1: any number */
	int in_request;
	int in_answer;
};

static int add_command_rules(void)
{
	const struct command_rule rules[] = {
		{ &s13.session_id, RULE_FIXED_HEAD, 1, 1, 1 },
		{ &s13.vendor_specific_application_id, RULE_OPTIONAL, 1, 1, 1 },
		{ &s13.result_code, RULE_OPTIONAL, 1, 0, 1 },
		{ &s13.experimental_result, RULE_OPTIONAL, 1, 0, 1 },
		{ &s13.auth_session_state, RULE_REQUIRED, 1, 1, 1 },
		{ &origin_host, RULE_REQUIRED, 1, 1, 1 },
		{ &origin_realm, RULE_REQUIRED, 1, 1, 1 },
		{ &s13.destination_host, RULE_OPTIONAL, 1, 1, 0 },
		{ &s13.destination_realm, RULE_REQUIRED, 1, 1, 0 },
		{ &s13.terminal_information, RULE_REQUIRED, 1, 1, 0 },
		{ &s13.user_name, RULE_OPTIONAL, 1, 1, 0 },
		{ &s13.equipment_status, RULE_OPTIONAL, 1, 0, 1 },
		{ &failed_avp, RULE_OPTIONAL, 1, 0, 1 },
		{ &proxy_info, RULE_OPTIONAL, -1, 1, 1 },
		{ &route_record, RULE_OPTIONAL, -1, 1, 1 },
	};

	for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
		struct dict_rule_data data = {
			*rules[i].avp, rules[i].position,
			rules[i].position == RULE_FIXED_HEAD ? 1 : 0, /* order: Session-Id first */
			rules[i].position == RULE_OPTIONAL ? 0 : 1, rules[i].max,
		};
		if (rules[i].in_request)
			CHECK_FCT(fd_dict_new(DICT, DICT_RULE, &data, s13.ecr, NULL));
		if (rules[i].in_answer)
			CHECK_FCT(fd_dict_new(DICT, DICT_RULE, &data, s13.eca, NULL));
	}
	return 0;
}

static int find_or_define_commands(void)
{
	command_code_t code = ME_IDENTITY_CHECK_CODE;
	struct dict_cmd_data data = {
		ME_IDENTITY_CHECK_CODE, "ME-Identity-Check-Request",
		CMD_FLAG_REQUEST | CMD_FLAG_PROXIABLE, CMD_FLAG_REQUEST | CMD_FLAG_PROXIABLE,
	};
	int ret = fd_dict_search(DICT, DICT_COMMAND, CMD_BY_CODE_R, &code, &s13.ecr, ENOENT);

	if (ret == 0) /* a dictionary extension defined S13 already: use its commands and rules */
		return fd_dict_search(DICT, DICT_COMMAND, CMD_ANSWER, s13.ecr, &s13.eca, ENOENT);
	if (ret != ENOENT)
		return ret;
	CHECK_FCT(fd_dict_new(DICT, DICT_COMMAND, &data, s13.application, &s13.ecr));
	data.cmd_name = "ME-Identity-Check-Answer";
	data.cmd_flag_val = CMD_FLAG_PROXIABLE; /* answer: R clear, P as in the request */
	CHECK_FCT(fd_dict_new(DICT, DICT_COMMAND, &data, s13.application, &s13.eca));
	return add_command_rules();
}

int s13_dict_init(void)
{
	CHECK_FCT(find_vendor());
	CHECK_FCT(find_application());
	CHECK_FCT(find_base_avps());
	CHECK_FCT(define_3gpp_avps());
	CHECK_FCT(find_or_define_commands());
	return 0;
}
