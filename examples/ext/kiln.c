/* A tiny PHP extension: kiln_version() returns the build's version string. */
#include "php.h"

PHP_FUNCTION(kiln_version)
{
    RETURN_STRING("1.0.0");
}

static const zend_function_entry kiln_functions[] = {
    PHP_FE(kiln_version, NULL)
    PHP_FE_END
};
