# syntax=docker/dockerfile:1
ARG PHP_VERSION=8.3
ARG NODE_VERSION=20

# composer dependencies
FROM composer:2 AS composer-deps
WORKDIR /app
COPY composer.json composer.lock ./
RUN --mount=type=cache,target=/tmp/cache composer install --no-dev --no-scripts

# node dependencies
FROM node:${NODE_VERSION} AS npm-deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm npm ci

FROM php:${PHP_VERSION}-fpm AS php-ext
RUN docker-php-ext-install pdo_mysql opcache

FROM php-ext AS app
COPY --from=composer-deps /app/vendor /var/www/vendor
COPY --from=npm-deps /app/node_modules /var/www/node_modules
COPY . /var/www

FROM app AS release
USER www-data
HEALTHCHECK --interval=10s CMD php-fpm -t || exit 1

FROM app AS dev
RUN pecl install xdebug

FROM dev AS test
RUN <<EOF
vendor/bin/phpunit
npm test
EOF
